//! Types and names shared by `lb`'s eBPF programs and its userspace.
//!
//! Everything that crosses the kernel boundary is `#[repr(C)]`, has explicit
//! padding, and a compile-time size check. Every map name used on either side
//! is a `pub const` in [`maps`].
#![no_std]

pub mod conn;
pub mod maps;
pub mod pool;
pub mod stats;
