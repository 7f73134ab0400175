//! lazyfs: a LazyFS-style FUSE file system for power-cut tests.
//!
//! `lazyfs BACKING MOUNTPOINT` mounts a passthrough view of BACKING whose
//! writes stay in memory until `fsync`/`fdatasync` writes them to BACKING.
//! Writing `cut` to `MOUNTPOINT/.lazyfs` is a power cut: what was not
//! fsync'd is gone, as after a real one. The same file arms faults (the
//! next fsync fails with EIO, the next write with ENOSPC) and strict
//! directory semantics; see `control` for the commands and
//! `tests/it/powercut.rs` in the gateway for the harness that drives it.
//!
//! It models what the gateway's crash-safety contract depends on, not a
//! whole disk: `sync_file_range` is not durable (FUSE never even sees it),
//! a failed fsync loses what it covered (errseq semantics, see `io`), and
//! the kernel caches nothing (`direct_io`, zero timeouts).
//!
//! SIGTERM, SIGINT or SIGHUP unmount (lazily, so a busy mount still goes)
//! and exit.

mod control;
mod fs;
mod io;
mod meta;
mod nodes;
mod ranges;
mod strict;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use fuser::{Config, MountOption, Session};

#[derive(Parser)]
#[command(about = "A FUSE file system that keeps unsynced writes in memory; `cut` drops them")]
struct Args {
    /// The directory holding what is durable.
    backing: PathBuf,
    /// Where to mount it.
    mountpoint: PathBuf,
    /// Directory entries are durable only after their directory's fsync.
    #[arg(long)]
    strict: bool,
    /// Threads answering the kernel.
    #[arg(long, default_value_t = 4)]
    threads: usize,
    /// Unmount and exit when the process that started this one dies (a
    /// test harness that crashed leaves no mount behind).
    #[arg(long)]
    die_with_parent: bool,
}

/// Blocks the stop signals in this thread and every thread started after,
/// so one thread can wait for them.
fn block_stop_signals() -> libc::sigset_t {
    // SAFETY: plain libc signal-set calls on a set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

fn detach(mountpoint: &std::path::Path) {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(mountpoint.as_os_str().as_bytes()) else {
        return;
    };
    // SAFETY: `c` is a valid NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
        // Not root: the setuid helper can.
        let _ = std::process::Command::new("fusermount3")
            .arg("-u")
            .arg("-z")
            .arg(mountpoint)
            .status();
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or("warn,fuser::session=error"),
    )
    .init();
    let args = Args::parse();
    let set = block_stop_signals();
    if args.die_with_parent {
        // SAFETY: prctl with an integer signal number.
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) };
    }
    let backing = match std::fs::canonicalize(&args.backing) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("lazyfs: backing directory {}: {e}", args.backing.display());
            return ExitCode::FAILURE;
        }
    };
    let fs = match fs::LazyFs::new(backing.clone(), args.strict) {
        Ok(fs) => fs,
        Err(e) => {
            eprintln!("lazyfs: {}: {e}", backing.display());
            return ExitCode::FAILURE;
        }
    };
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(format!("lazyfs:{}", backing.display())),
        MountOption::Subtype("lazyfs".into()),
    ];
    config.n_threads = Some(args.threads.max(1));
    config.clone_fd = true;
    let session = match Session::new(fs, &args.mountpoint, &config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("lazyfs: mounting on {}: {e}", args.mountpoint.display());
            return ExitCode::FAILURE;
        }
    };
    let mountpoint = args.mountpoint.clone();
    std::thread::spawn(move || {
        let mut sig = 0;
        // SAFETY: waits on the set built above; `sig` is ours.
        unsafe { libc::sigwait(&set, &mut sig) };
        detach(&mountpoint);
        // The session ends once the kernel lets go; do not wait forever.
        std::thread::sleep(Duration::from_secs(3));
        std::process::exit(0);
    });
    eprintln!(
        "lazyfs: {} mounted on {}{}",
        backing.display(),
        args.mountpoint.display(),
        if args.strict { " (strict)" } else { "" }
    );
    match session.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lazyfs: {e}");
            ExitCode::FAILURE
        }
    }
}
