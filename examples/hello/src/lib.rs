//! A greeting built from the event: `{"name": "Ada"}` -> `{"greeting": "Hello, Ada!"}`.

use kiln_sdk::{Context, Error};
use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
struct Request {
    #[serde(default)]
    name: Option<String>,
}

#[derive(Serialize)]
struct Response {
    greeting: String,
    request_id: String,
    function: String,
    version: String,
}

#[kiln_sdk::handler]
fn hello(event: Request, ctx: &Context) -> Result<Response, Error> {
    let name = event.name.unwrap_or_else(|| "world".to_owned());
    if name.trim().is_empty() {
        return Err(Error::new("InvalidName", "name must not be blank"));
    }
    kiln_sdk::log::info(&format!("greeting {name}"));
    Ok(Response {
        greeting: format!("Hello, {name}!"),
        request_id: ctx.request_id.clone(),
        function: ctx.function_name.clone(),
        version: ctx.function_version.clone(),
    })
}
