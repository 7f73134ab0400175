//! The table of results and RESULTS.md around it.

use std::fmt::Write as _;

use crate::Row;

pub fn render(rows: &[Row]) -> String {
    let mut t = String::from(
        "| scenario | asyncgate | baseline (same run) | ratio | target | met |\n| --- | --- | --- | --- | --- | --- |\n",
    );
    for r in rows {
        let ratio = r.ratio.map_or("—".into(), |x| format!("{x:.2}×"));
        let met = if r.met { "yes" } else { "**no**" };
        let _ = writeln!(
            t,
            "| {} | {} | {} | {ratio} | {} | {met} |",
            r.scenario, r.figure, r.baseline, r.target
        );
    }
    t
}

pub fn results_md(table: &str) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_string())
        })
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb >> 20);
    let when = asyncgate::model::format_time(asyncgate::model::now_ms());
    format!(
        "# Benchmark results\n\nA full run of `cargo bench --bench gateway` ({when} UTC) on {cores} cores ({cpu}), \
         {mem} GiB of memory. Everything (load generator, baselines, fake upstream, the release gateway) ran on \
         127.0.0.1 on this one machine, so they share its 2 cores; ratios against baselines measured in the same \
         run are the comparison, absolute figures are beside them.\n\n{table}\n"
    )
}
