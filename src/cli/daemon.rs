//! Daemon commands: start, stop, list, recover. (Filled in by the ublk work.)

use super::{fail, CliError};
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct StartArgs {
    /// The image file or block device.
    pub image: PathBuf,
    /// Device ID (N in /dev/ublkbN); the kernel picks one when omitted.
    #[arg(short = 'n', long = "number")]
    pub id: Option<i32>,
    /// Number of queues (default: min(cores, 4)).
    #[arg(long)]
    pub queues: Option<u16>,
    /// Queue depth.
    #[arg(long, default_value_t = 128)]
    pub depth: u16,
    /// Make every write durable before completing it.
    #[arg(long)]
    pub writethrough: bool,
    /// Serve the image read-only.
    #[arg(long)]
    pub read_only: bool,
    /// Stay in the foreground instead of detaching.
    #[arg(long)]
    pub foreground: bool,
}

#[derive(Args, Debug)]
pub struct StopArgs {
    #[arg(short = 'n', long = "number")]
    pub id: Option<i32>,
    #[arg(long)]
    pub all: bool,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    #[arg(long, value_parser = ["human", "json"], default_value = "human")]
    pub output: String,
}

#[derive(Args, Debug)]
pub struct RecoverArgs {
    #[arg(short = 'n', long = "number")]
    pub id: i32,
}

pub fn start(_a: StartArgs) -> Result<i32, CliError> {
    Err(fail("fvd start: the ublk front end is not built yet"))
}

pub fn stop(_a: StopArgs) -> Result<i32, CliError> {
    Err(fail("fvd stop: the ublk front end is not built yet"))
}

pub fn list(_a: ListArgs) -> Result<i32, CliError> {
    Err(fail("fvd list: the ublk front end is not built yet"))
}

pub fn recover(_a: RecoverArgs) -> Result<i32, CliError> {
    Err(fail("fvd recover: the ublk front end is not built yet"))
}
