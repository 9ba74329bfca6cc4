//! Test fixture: a function written on the public `lambda_runtime` crate,
//! unchanged from how it would run on AWS Lambda.

use lambda_runtime::{Error, LambdaEvent, service_fn};
use serde_json::{Value, json};

async fn handler(event: LambdaEvent<Value>) -> Result<Value, Error> {
    let (payload, ctx) = event.into_parts();
    let arg = payload["arg"].clone();
    match payload["action"].as_str().unwrap_or("echo") {
        "echo" => Ok(json!({ "echo": arg })),
        "context" => Ok(json!({
            "request_id": ctx.request_id,
            "invoked_function_arn": ctx.invoked_function_arn,
            "deadline": ctx.deadline,
            "xray_trace_id": ctx.xray_trace_id,
            "function_name": ctx.env_config.function_name,
            "memory": ctx.env_config.memory,
            "version": ctx.env_config.version,
            "log_stream": ctx.env_config.log_stream,
            "client_context": ctx.client_context,
        })),
        "env" => Ok(json!(
            std::env::vars().collect::<std::collections::BTreeMap<_, _>>()
        )),
        "tmp" => {
            let n: u64 = std::fs::read_to_string("/tmp/lambda-rt-count")
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0)
                + 1;
            std::fs::write("/tmp/lambda-rt-count", n.to_string())?;
            Ok(json!({ "count": n }))
        }
        "error" => Err("requested failure".into()),
        "sleep" => {
            tokio::time::sleep(std::time::Duration::from_millis(
                arg.as_u64().unwrap_or(1000),
            ))
            .await;
            Ok(json!("slept"))
        }
        "grow" => {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(vec![1u8; 8 << 20]);
                std::hint::black_box(&hoard);
            }
        }
        other => Err(format!("no action named {other}").into()),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    lambda_runtime::run(service_fn(handler)).await
}
