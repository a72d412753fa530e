//! Prints a fixed greeting; the smallest possible smoke test.

fn main() {
    println!("Hello from Kiln!");
}
