//! The control API: HTTP/1.1 over a Unix socket, JSON bodies, Firecracker's paths and
//! field names (so its users' scripts work), plus skiff's own `GET /stats`.
//!
//! - `server.rs`: the socket and its clients ([`ApiServer`]): an fd for the event
//!   loop, parsed requests out, responses in, bounded everywhere.
//! - `request.rs`: method + path + body to an [`ApiRequest`], strictly (unknown
//!   fields refused, naming them).
//! - `dispatch.rs`: the [`Controller`] trait the VMM implements and [`dispatch`],
//!   which maps its outcome to a status and body.
//!
//! Wiring: `ApiServer::bind(path)` before the run (its error is one line for
//! main to print), `event_loop.add(api.fd(), Source::Api)`, and on `Source::Api`:
//! ```ignore
//! for inc in api.take_requests() {
//!     let resp = api::dispatch(&inc.request, &mut controller);
//!     api.respond(inc.token, resp);
//! }
//! ```

mod dispatch;
mod request;
mod server;

#[cfg(test)]
mod tests;

pub use dispatch::{ApiResponse, ControlError, Controller, InstanceInfo, InstanceState, MachineConfig, Status, dispatch};
pub use request::{ActionType, ApiRequest, SnapshotCreate, SnapshotLoad, SnapshotType, VmStateChange};
pub use server::{ApiServer, Incoming, MAX_BODY, MAX_CONNECTIONS, ServerError, Token};
