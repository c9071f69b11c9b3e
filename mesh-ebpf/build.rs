//! Rebuild the kernel object when the bpf-linker binary changes.
use which::which;

fn main() {
    match which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(_) => println!("cargo:warning=bpf-linker not on PATH: run `make setup`"),
    }
}
