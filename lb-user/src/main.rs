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
    let cli = lb::cli::Cli::parse();
    match lb::cli::main(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
