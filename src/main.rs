use clap::Parser;

use asyncgate::config::{Cli, Command};
use asyncgate::{admin_cli, app, demo};

#[actix_web::main]
async fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => match app::start(&args.upstream, &args.gateway).await {
            Ok(running) => app::run_until_signal(running).await,
            Err(e) => Err(e),
        },
        Command::Demo(args) => demo::run(&args).await,
        Command::Admin(args) => match admin_cli::run(&args).await {
            Ok(body) => {
                println!("{body}");
                Ok(())
            }
            Err(e) => {
                eprintln!("asyncgate admin: {e}");
                std::process::exit(1);
            }
        },
    };
    if let Err(e) = result {
        eprintln!("asyncgate: {e}");
        std::process::exit(1);
    }
}
