//! SPEC §11: what the package ships besides the binary. Completions and
//! man pages come from the real binary.

use std::process::Command;

fn run(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_asyncgate"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "asyncgate {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn completions_for_bash_zsh_and_fish_name_the_subcommands_and_flags() {
    for (shell, marker) in [
        ("bash", "complete -F _asyncgate"),
        ("zsh", "#compdef asyncgate"),
        ("fish", "complete -c asyncgate"),
    ] {
        let script = run(&["completions", shell]);
        assert!(script.contains(marker), "{shell}: no {marker:?}");
        for word in ["serve", "demo", "admin", "upstream", "data-dir"] {
            assert!(script.contains(word), "{shell}: {word} missing");
        }
    }
    // bash reads the script and registers the completion.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("asyncgate.bash");
    std::fs::write(&file, run(&["completions", "bash"])).unwrap();
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "source {} && complete -p asyncgate",
            file.display()
        ))
        .output()
        .unwrap();
    let registered = String::from_utf8_lossy(&out.stdout);
    assert!(registered.contains("_asyncgate"), "{out:?}");
    let out = Command::new(env!("CARGO_BIN_EXE_asyncgate"))
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "an unknown shell is refused");
}

#[test]
fn man_pages_are_roff_made_from_the_flag_definitions() {
    let main = run(&["man"]);
    assert!(main.contains("\n.TH asyncgate 1 "), "{main}");
    assert!(main.contains(".SH SUBCOMMANDS"), "{main}");
    assert!(main.contains("asyncgate\\-serve(1)"), "{main}");
    let serve = run(&["man", "serve"]);
    assert!(serve.contains("\n.TH asyncgate-serve 1 "), "{serve}");
    // Every flag `serve --help` shows is on the page, with its variable.
    let help = run(&["serve", "--help"]);
    let flags: Vec<&str> = help
        .split_whitespace()
        .filter(|w| w.starts_with("--") && w.len() > 2 && *w != "--help")
        .map(|w| w.trim_end_matches(|c: char| !c.is_ascii_alphanumeric()))
        .collect();
    assert!(flags.len() > 20, "{help}");
    for flag in flags {
        let roff = flag.replace('-', "\\-");
        assert!(
            serve.contains(&roff),
            "{flag} missing from asyncgate-serve(1)"
        );
        let var = format!("ASYNCGATE_{}", flag[2..].to_uppercase().replace('-', "_"));
        assert!(
            serve.contains(&var),
            "{var} missing from asyncgate-serve(1)"
        );
    }
    let admin_list = run(&["man", "admin", "list"]);
    assert!(admin_list.contains("\n.TH asyncgate-admin-list 1 "));

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("man1");
    run(&["man", "--out-dir", out.to_str().unwrap()]);
    let mut pages: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    pages.sort();
    for page in ["asyncgate.1", "asyncgate-serve.1", "asyncgate-admin-list.1"] {
        assert!(pages.iter().any(|p| p == page), "{page} not in {pages:?}");
    }
    assert_eq!(
        std::fs::read_to_string(out.join("asyncgate-serve.1")).unwrap(),
        serve
    );
}
