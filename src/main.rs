//! resync: replicate ZFS datasets between hosts, syncoid-style, and finish the
//! job over links that break. `main` only parses the command line, dispatches
//! and maps the result to an exit code, in one place: 0 all done, 1 some
//! datasets of a recursive run failed, 2 error (usage errors included).

mod bwlimit;
mod chunk;
mod cli;
mod compress;
mod endpoint;
mod generate;
mod host;
mod plan;
mod progress;
mod replicate;
mod report;
mod runlock;
mod sys;
mod transfer;
mod zfs;

use clap::Parser;

fn main() {
    std::process::exit(run());
}

fn run() -> i32 {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    if args
        .first()
        .and_then(|a| a.to_str())
        .is_some_and(|a| chunk::SUBCOMMANDS.contains(&a))
    {
        return chunk::helper_main(&args);
    }
    if args.first().and_then(|a| a.to_str()) == Some(generate::SUBCOMMAND) {
        return generate::main(&args[1..]);
    }
    if args
        .first()
        .and_then(|a| a.to_str())
        .is_some_and(|a| compress::filter::SUBCOMMANDS.contains(&a))
    {
        return compress::filter::main(&args);
    }
    if args
        .first()
        .and_then(|a| a.to_str())
        .is_some_and(|a| transfer::direct::SUBCOMMANDS.contains(&a))
    {
        return transfer::direct::main(&args);
    }
    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    let config = match cli.resolve() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("resync: error: {e:#}");
            return 2;
        }
    };
    let ui = progress::reporter(config.verbosity);
    for notice in &config.notices {
        ui.info(&format!("note: {notice}"));
    }
    let reports = report::Reports::default();
    let started = std::time::Instant::now();
    let result = replicate::run(&config, &*ui, &reports);
    let done = reports.copied();
    if result.is_ok() && done.len() > 1 {
        ui.info(&report::totals_line(&done, started.elapsed()));
    }
    let (code, error) = match result {
        Ok(outcome) if outcome.failed.is_empty() => (0, None),
        Ok(outcome) => {
            eprintln!(
                "resync: {} of {} datasets failed:",
                outcome.failed.len(),
                outcome.failed.len() + outcome.replicated
            );
            for (label, err) in &outcome.failed {
                eprintln!("  {label}: {err:#}");
            }
            (1, None)
        }
        Err(e) => {
            eprintln!("resync: error: {e:#}");
            (2, Some(format!("{e:#}")))
        }
    };
    if config.json {
        println!(
            "{}",
            report::to_json(
                &config.source.to_string(),
                &config.target.to_string(),
                &reports.take(),
                started.elapsed(),
                error.as_deref(),
                code,
            )
        );
    }
    code
}

/// `--help` and `--version` print and exit 0; anything else is one line and 2.
fn usage_error(e: clap::Error) -> i32 {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = e.print();
            0
        }
        _ => {
            // clap's message spans lines ("...not provided:\n  <TARGET>")
            // before its usage block; fold it into the one line we print.
            let rendered = e.render().to_string();
            let message: Vec<&str> = rendered
                .lines()
                .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more"))
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            let message = message.join(" ");
            let message = message.trim_start_matches("error: ");
            eprintln!("resync: error: {message} (see resync --help)");
            2
        }
    }
}
