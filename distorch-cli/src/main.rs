//! `distorch`: plan and inspect how a model is split across devices, and generate images
//! and videos with it.
//!
//! Exit codes: 0 success; 2 a string that did not parse (allocation, device declaration,
//! device list, size: the message has a caret under the fault) or a usage error; 1 any other
//! error (the message names the device or file at fault).

#![allow(clippy::print_stdout, clippy::print_stderr)]

mod cli;
mod generate;
mod generate_flux;
mod generate_video;
mod inspect;
mod plan;
mod run;
mod tensors;

use std::process::ExitCode;

use clap::Parser;

use cli::{Cli, Command};

/// An error as the command line reports it.
pub(crate) enum Failure {
    /// A string did not parse: exit 2.
    Parse(distorch::alloc::ParseError),
    /// Anything else: exit 1.
    Other(String),
}

impl From<distorch::alloc::ParseError> for Failure {
    fn from(e: distorch::alloc::ParseError) -> Self {
        Failure::Parse(e)
    }
}

impl From<distorch::alloc::Error> for Failure {
    fn from(e: distorch::alloc::Error) -> Self {
        match e {
            distorch::alloc::Error::Parse(p) => Failure::Parse(p),
            other => Failure::Other(other.to_string()),
        }
    }
}

impl From<distorch::backends::Error> for Failure {
    fn from(e: distorch::backends::Error) -> Self {
        Failure::Other(e.to_string())
    }
}

impl From<distorch::core::Error> for Failure {
    fn from(e: distorch::core::Error) -> Self {
        Failure::Other(e.to_string())
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Plan(args) => plan::run(&args),
        Command::Inspect(args) => inspect::run(&args),
        Command::Devices(args) => plan::devices(&args),
        Command::Run(args) => run::run(&args),
        Command::Generate { kind } => match kind {
            generate::GenerateKind::Image(a) => generate::image(&a),
            generate::GenerateKind::Video(a) => generate_video::video(&a),
            generate::GenerateKind::Flux(a) => generate_flux::flux(&a),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Parse(e)) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
        Err(Failure::Other(msg)) => {
            eprintln!("error: {msg}");
            ExitCode::from(1)
        }
    }
}
