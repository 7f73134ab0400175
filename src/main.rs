use clap::Parser;

use asyncgate::config::{Cli, Command, LogFormat};
use asyncgate::{admin_cli, app, cli_docs, demo, logging};

#[actix_web::main]
async fn main() {
    let cli = Cli::parse();
    logging::init(match &cli.command {
        Command::Serve(args) => args.gateway.log_format,
        Command::Demo(args) => args.gateway.log_format,
        _ => LogFormat::Text,
    });
    // Crash-only: a panic on any thread (the engine, the flusher, the
    // sweeper) stops the process rather than leave a gateway that answers
    // `/healthz` while part of it is dead. State is durable and recovery
    // runs on the next start.
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        log::error!("a thread panicked; stopping (exit 101) so that a restart recovers");
        std::process::exit(101);
    }));
    let result = match cli.command {
        Command::Serve(args) => match app::start(&args.upstream, &args.gateway).await {
            Ok(running) => app::run_until_signal(running).await,
            Err(e) => Err(e),
        },
        Command::Demo(args) => demo::run(&args).await,
        Command::Completions { shell } => {
            exit_on_error(cli_docs::print(&cli_docs::completions(shell)))
        }
        Command::Man(args) => exit_on_error(cli_docs::run_man(&args)),
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

/// For the commands that only print: a failed write is exit 1, not a panic.
fn exit_on_error(result: std::io::Result<()>) -> Result<(), app::AppError> {
    if let Err(e) = result {
        eprintln!("asyncgate: {e}");
        std::process::exit(1);
    }
    Ok(())
}
