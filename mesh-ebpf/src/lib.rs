#![no_std]
//! Library target of the kernel-program crate (aya's layout); the programs are in `main.rs`.
