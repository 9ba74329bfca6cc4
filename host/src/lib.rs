//! kiln: a self-hosted, Lambda-compatible function platform.
//!
//! Module map (see DESIGN.md):
//! - [`api`]: the HTTP API (Lambda's REST API, health);
//! - [`auth`]: SigV4 authentication, credentials, IAM-style authorization;
//! - [`audit`]: the signed audit trail of control-plane calls, and its
//!   verifier;
//! - [`control`]: functions and their configuration;
//! - [`invoke`]: the data plane (environments, invocations);
//! - [`sandbox`]: the trait every kind of isolation implements, and its
//!   implementations;
//! - [`store`]: the metadata store and the artifact store;
//! - [`package`]: deployment packages (zips);
//! - [`server`]: `kiln serve`, wiring the above together;
//! - [`doctor`]: which sandboxes this machine can run;
//! - [`host_limits`]: what environments may take from the host together.

pub mod api;
pub mod audit;
pub mod auth;
pub mod control;
pub mod doctor;
pub mod host_limits;
pub mod invoke;
pub mod metrics;
pub mod package;
pub mod sandbox;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod vmm;
