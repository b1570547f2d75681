use std::io::Write as _;

use clap::Parser as _;

fn main() -> std::process::ExitCode {
    let mut log = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    // Workers tag their lines so a supervisor's log tells them apart.
    if let Ok(tag) = std::env::var("LB_LOG_TAG") {
        log.format(move |buf, r| {
            let ts = buf.timestamp();
            writeln!(buf, "[{ts} {:<5} {} {tag}] {}", r.level(), r.target(), r.args())
        });
    }
    log.init();
    // Any panic ends the process. A thread that ended alone (a holder's
    // close watcher, a worker's link to its holder) would leave a process
    // that looks alive and does nothing; one that ends is seen by its
    // supervisor and restarted.
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        log::error!("a thread panicked: ending the process");
        std::process::abort();
    }));
    let cli = lb::cli::Cli::parse();
    match lb::cli::main(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
