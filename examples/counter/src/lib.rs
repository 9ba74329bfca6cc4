//! Counts the invocations its execution environment has served, in a file
//! under /tmp: the count grows while the environment stays warm and starts
//! over in a new one, which makes environment reuse visible.

use kiln_sdk::{Context, Error};
use serde::{Deserialize, Serialize};
use std::fs;

const COUNTER: &str = "/tmp/invocations";

#[derive(Deserialize)]
struct Request {}

#[derive(Serialize)]
struct Response {
    count: u64,
    request_id: String,
}

#[kiln_sdk::handler(init = start)]
fn count(_event: Request, ctx: &Context) -> Result<Response, Error> {
    let previous: u64 = fs::read_to_string(COUNTER)?.trim().parse()?;
    let count = previous + 1;
    fs::write(COUNTER, count.to_string())?;
    Ok(Response {
        count,
        request_id: ctx.request_id.clone(),
    })
}

/// A new environment starts at zero.
fn start() -> Result<(), Error> {
    fs::write(COUNTER, "0")?;
    Ok(())
}
