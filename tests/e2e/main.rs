//! End-to-end tests: the real app (in-process on port 0, or the real binary)
//! against the fake Graph over HTTPS. Nothing here touches the internet.

mod api_input;
mod clearing;
mod helpers;
mod process;
mod shutdown;
