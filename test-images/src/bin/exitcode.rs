//! Exits with the status given as argv[1] (default 0), to test exit-status
//! propagation.

fn main() {
    let code: i32 = match std::env::args().nth(1) {
        None => 0,
        Some(arg) => match arg.parse() {
            Ok(code) => code,
            Err(_) => {
                eprintln!("exitcode: not an integer: {arg}");
                std::process::exit(2);
            }
        },
    };
    println!("exiting with {code}");
    std::process::exit(code);
}
