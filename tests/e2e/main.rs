//! End-to-end tests: the real app (in-process on port 0, or the real binary)
//! against the fake Graph over HTTPS. Nothing here touches the internet.

// Test helpers outside #[test] functions are still test code: a panic on an
// unexpected error is the failure report we want.
#![allow(clippy::unwrap_used)]

mod api_input;
mod clearing;
mod cli;
mod credentials;
mod dev;
mod helpers;
mod process;
mod recipes;
mod shutdown;
mod systemd;
