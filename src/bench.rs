//! `fvd bench` (filled in below).
use clap::Args;

#[derive(Args, Debug)]
pub struct BenchArgs {}

pub fn run(_a: BenchArgs) -> Result<i32, String> {
    Err("bench not built yet".into())
}
