//! One integration test binary: real `trackersync` processes, real sled on disk, driven through
//! the CLI and the local API.

mod support;

mod api;
mod bundle;
mod cli;
mod crash;
mod disk;
mod faults;
mod flood;
mod hostile;
mod manage;
mod mdns;
mod netfault;
mod partition;
mod sim;
mod sync;
