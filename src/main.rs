fn main() {
    fvd::logging::init();
    std::process::exit(fvd::cli::main());
}
