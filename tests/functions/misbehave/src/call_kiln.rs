//! Shared by both fixtures (`native-misbehave` includes this file): calls
//! kiln from inside the function with its execution role's credentials.

use serde_json::{Value, json};

/// `{"function": NAME, "payload": ..., "endpoint": URL?}`: calls kiln with
/// the environment's role credentials and reports what came back.
pub fn call_kiln(arg: &Value) -> Value {
    use kiln_sdk::lambda::{Client, ClientError};
    let name = arg["function"].as_str().unwrap_or_default();
    let payload = serde_json::to_vec(&arg["payload"]).unwrap_or_default();
    let client = match arg["endpoint"].as_str() {
        Some(endpoint) => Client::from_env().and_then(|c| c.at(endpoint)),
        None => Client::from_env(),
    };
    match client.and_then(|c| c.invoke(name, &payload)) {
        Ok(out) => json!({
            "status": out.status,
            "function_error": out.function_error,
            "payload": String::from_utf8_lossy(&out.payload),
        }),
        Err(ClientError::Api {
            status,
            error_type,
            message,
        }) => {
            json!({"status": status, "error_type": error_type, "message": message})
        }
        Err(e) => json!({"error": e.to_string()}),
    }
}
