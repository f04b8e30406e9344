//! Channel benchmark (filled in below).
fn main() {}
