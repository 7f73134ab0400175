//! SPEC §11: what the package ships besides the binary. Completions and
//! man pages come from the real binary; the Grafana dashboard
//! (`packaging/grafana-dashboard.json`) may query only series a live
//! gateway's `/metrics` serves, and charts every one of them.

use std::collections::BTreeSet;
use std::process::Command;

use crate::helpers::*;

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

/// PromQL words that are not series names.
const NOT_SERIES: [&str; 25] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "atan2",
    "sum",
    "avg",
    "min",
    "max",
    "count",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
    "group",
    "Inf",
];

/// The series names a PromQL expression selects: identifiers outside label
/// matchers, ranges and strings that are neither functions, aggregations,
/// keywords nor the label lists of `by (...)` and the like.
fn series_in(expr: &str) -> BTreeSet<String> {
    // Blank out `{...}`, `[...]` and string literals.
    let mut plain = String::new();
    let (mut braces, mut brackets, mut quote) = (0, 0, None);
    for c in expr.chars() {
        if let Some(q) = quote {
            if c == q {
                quote = None;
            }
            continue;
        }
        match c {
            '"' | '\'' | '`' => quote = Some(c),
            '{' => braces += 1,
            '}' => braces -= 1,
            '[' => brackets += 1,
            ']' => brackets -= 1,
            _ if braces == 0 && brackets == 0 => {
                plain.push(c);
                continue;
            }
            _ => {}
        }
        plain.push(' ');
    }
    let chars: Vec<char> = plain.chars().collect();
    let next_non_space = |from: usize| chars[from..].iter().find(|c| !c.is_whitespace());
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let start = i;
        if c.is_ascii_alphabetic() || c == '_' || c == ':' || c == '$' {
            i += 1;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || "_:".contains(chars[i])) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            if matches!(
                word.as_str(),
                "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
            ) && next_non_space(i) == Some(&'(')
            {
                // Skip the label list.
                while i < chars.len() && chars[i] != ')' {
                    i += 1;
                }
            } else if !word.starts_with('$')
                && next_non_space(i) != Some(&'(')
                && !NOT_SERIES.contains(&word.as_str())
            {
                names.insert(word);
            }
        } else if c.is_ascii_digit() || c == '.' {
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else {
            i += 1;
        }
    }
    names
}

#[test]
fn promql_series_names_are_told_from_functions_labels_and_keywords() {
    let names = |e: &str| series_in(e).into_iter().collect::<Vec<_>>();
    assert_eq!(
        names(
            "histogram_quantile(0.95, sum by (le) (rate(a_bucket{job=\"x\",le!=\"1e3\"}[$__rate_interval])))"
        ),
        ["a_bucket"]
    );
    assert_eq!(
        names("sum(rate(a_total[5m])) by (code) / on (code) group_left sum without (x) (b) > 0.5"),
        ["a_total", "b"]
    );
    assert_eq!(
        names("max_over_time(c[1h:5m]) or vector(0) unless d offset 5m"),
        ["c", "d"]
    );
}

/// Every `expr` string anywhere in the dashboard.
fn exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr", serde_json::Value::String(e)) => out.push(e.clone()),
                    _ => exprs(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

#[actix_web::test]
async fn the_grafana_dashboard_charts_exactly_the_series_a_live_gateway_serves() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/packaging/grafana-dashboard.json"
    );
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut queries = Vec::new();
    exprs(&dashboard, &mut queries);
    assert!(queries.len() >= 10, "only {} queries", queries.len());
    let charted: BTreeSet<String> = queries.iter().flat_map(|e| series_in(e)).collect();

    // A gateway that has executed something serves every labelled series
    // (`asyncgate_executed_total{code}` appears with its first result).
    let up = Fake::start().await;
    let app = TestApp::start(&up.url(), &[]).await;
    let id = app.submit("POST", "/async_api/v2/x.json", &[], b"{}").await;
    app.wait_for_status(&id, None, "done", SECS(10)).await;
    let scrape = String::from_utf8(app.call("GET", "/metrics", &[], b"").await.body).unwrap();
    app.stop().await;
    // Sample names (histograms as their _bucket, _sum and _count) and the
    // families they belong to.
    let served: BTreeSet<&str> = scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let families: BTreeSet<&str> = scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();

    for name in &charted {
        assert!(
            served.contains(name.as_str()),
            "the dashboard queries {name}, which /metrics does not serve:\n{scrape}"
        );
    }
    for family in &families {
        let histogram_part = |s: &str| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .any(|suffix| s.strip_suffix(suffix) == Some(family))
        };
        assert!(
            charted
                .iter()
                .any(|c| c == family || histogram_part(c.as_str())),
            "/metrics serves {family}, which no dashboard panel charts: add one"
        );
    }
}

/// The GitHub anchor of a Markdown heading: lower case, spaces to `-`,
/// other punctuation dropped.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// SPEC §11: the repository documents the contract in its own files. Every
/// link in the README, ARCHITECTURE.md and docs/ names a file that exists
/// (and, with `#`, a heading in it); the README links nowhere outside.
#[test]
fn documentation_links_only_to_files_in_the_repository() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut pages = vec![root.join("README.md"), root.join("ARCHITECTURE.md")];
    for entry in std::fs::read_dir(root.join("docs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") {
            pages.push(path);
        }
    }
    let mut checked = 0;
    for page in &pages {
        let text = std::fs::read_to_string(page).unwrap();
        let shown = page.strip_prefix(root).unwrap().display().to_string();
        for (at, _) in text.match_indices("](") {
            let rest = &text[at + 2..];
            let target = &rest[..rest.find(')').unwrap()];
            if target.starts_with("http://") || target.starts_with("https://") {
                assert!(
                    !shown.starts_with("README"),
                    "{shown} links outside the repository: {target}"
                );
                continue;
            }
            let (file, fragment) = target.split_once('#').unwrap_or((target, ""));
            let linked = if file.is_empty() {
                page.clone()
            } else {
                page.parent().unwrap().join(file)
            };
            assert!(
                linked.exists(),
                "{shown} links to {target}, which is not there"
            );
            if !fragment.is_empty() {
                let headings = std::fs::read_to_string(&linked).unwrap();
                assert!(
                    headings
                        .lines()
                        .filter_map(|l| l.strip_prefix('#'))
                        .any(|h| anchor(h.trim_start_matches('#')) == fragment),
                    "{shown} links to {target}: no such heading"
                );
            }
            checked += 1;
        }
    }
    assert!(checked > 20, "only {checked} links found");
}

/// Grafana lays panels out by `gridPos`: two on the same cells hide one
/// another (the held long-polls panel once sat on the status codes).
#[test]
fn dashboard_panels_do_not_overlap() {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/grafana-dashboard.json"),
    )
    .unwrap();
    let d: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut cells: BTreeSet<(u64, u64)> = BTreeSet::new();
    for p in d["panels"].as_array().unwrap() {
        let g = &p["gridPos"];
        let (x, y, w, h) = (
            g["x"].as_u64().unwrap(),
            g["y"].as_u64().unwrap(),
            g["w"].as_u64().unwrap(),
            g["h"].as_u64().unwrap(),
        );
        assert!(x + w <= 24, "{} is wider than the grid", p["title"]);
        for cx in x..x + w {
            for cy in y..y + h {
                assert!(
                    cells.insert((cx, cy)),
                    "{} overlaps another panel",
                    p["title"]
                );
            }
        }
    }
}
