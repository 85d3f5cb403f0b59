//! The `fvd` binary: the command line, the benchmarks and the logging setup,
//! over the library.

mod bench;
mod cli;
mod logging;

fn main() {
    std::process::exit(cli::main());
}
