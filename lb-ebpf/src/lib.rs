#![no_std]
// Empty library target: lb-user depends on it so cargo rebuilds lb-user when
// the eBPF crate changes (see lb-user/build.rs).
