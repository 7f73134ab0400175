//! `asyncgate completions <shell>` and `asyncgate man`: shell completions
//! and man pages generated from [`Cli`], the same definitions that print
//! `--help`, so neither can drift from the flags (SPEC §11). The package
//! (`packaging/build-deb`) runs these at build time; nothing is checked in.
//!
//! Man pages follow git's layout: `asyncgate(1)` names the subcommands,
//! and each has its own page (`asyncgate-serve(1)` holds the gateway's
//! flags with their `ASYNCGATE_*` variables).

use std::io::{self, Write};
use std::path::Path;

use clap::CommandFactory;
use clap_complete::Shell;

use crate::config::{Cli, ManArgs};

/// The completion script for `shell`.
pub fn completions(shell: Shell) -> Vec<u8> {
    let mut cmd = Cli::command();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, "asyncgate", &mut out);
    out
}

/// The command tree as the man pages see it: built (so subcommands know
/// their full names, `asyncgate-serve`), without clap's `help` subcommand.
fn command() -> clap::Command {
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    cmd
}

/// The roff source of `asyncgate(1)`, or of the page of the subcommand
/// named by `path` (`["admin", "list"]` is `asyncgate-admin-list(1)`).
pub fn man_page(path: &[String]) -> io::Result<Vec<u8>> {
    let mut page = command();
    for name in path {
        page = page.find_subcommand(name).cloned().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("no subcommand `{name}` (see `asyncgate --help`)"),
            )
        })?;
    }
    let mut out = Vec::new();
    man(page).render(&mut out)?;
    Ok(out)
}

/// One page; every page names the release (clap gives subcommands none).
fn man(page: clap::Command) -> clap_mangen::Man {
    clap_mangen::Man::new(page).source(concat!("asyncgate ", env!("CARGO_PKG_VERSION")))
}

/// Writes every page into `dir` (created if missing): `asyncgate.1` and
/// one per subcommand, `asyncgate-admin-list.1` included.
pub fn write_man_pages(dir: &Path) -> io::Result<()> {
    fn write(cmd: &clap::Command, dir: &Path) -> io::Result<()> {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            write(sub, dir)?;
        }
        man(cmd.clone()).generate_to(dir).map(drop)
    }
    std::fs::create_dir_all(dir)?;
    write(&command(), dir)
}

/// `asyncgate man`.
pub fn run_man(args: &ManArgs) -> io::Result<()> {
    match &args.out_dir {
        Some(dir) => write_man_pages(dir),
        None => print(&man_page(&args.subcommand)?),
    }
}

/// Writes to stdout; a reader that stopped early (`| head`) is not an error.
pub fn print(bytes: &[u8]) -> io::Result<()> {
    let mut out = io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shell_completes_the_subcommands() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let text = String::from_utf8(completions(shell)).unwrap();
            for word in ["serve", "demo", "admin", "upstream"] {
                assert!(text.contains(word), "{shell}: {word} missing");
            }
        }
    }

    #[test]
    fn the_serve_page_names_every_flag_and_its_variable() {
        let page = String::from_utf8(man_page(&["serve".into()]).unwrap()).unwrap();
        assert!(page.contains("\n.TH asyncgate-serve 1 "), "{page}");
        assert!(page.contains("ASYNCGATE_UPSTREAM"), "{page}");
        assert!(page.contains("ASYNCGATE_SHUTDOWN_TIMEOUT"), "{page}");
        assert!(man_page(&["nonesuch".into()]).is_err());
    }
}
