//! The work of `examples/hello` as a `wasi:http/proxy` component, for
//! `wasmtime serve`: read the JSON body, greet the name in it, answer JSON.
//! The benchmark compares it with kiln invoking `examples/hello`.

#[cfg(target_family = "wasm")]
mod component {
    use std::io::{Read as _, Write as _};

    use wasi::http::types::{
        Fields, IncomingBody, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
    };

    #[derive(serde::Deserialize)]
    struct Event {
        name: Option<String>,
    }

    struct Hello;

    wasi::http::proxy::export!(Hello);

    impl wasi::exports::http::incoming_handler::Guest for Hello {
        fn handle(request: IncomingRequest, out: ResponseOutparam) {
            let mut body = Vec::new();
            if let Ok(incoming) = request.consume() {
                if let Ok(mut stream) = incoming.stream() {
                    let _ = stream.read_to_end(&mut body);
                }
                let _ = IncomingBody::finish(incoming);
            }
            let name = serde_json::from_slice::<Event>(&body)
                .ok()
                .and_then(|e| e.name)
                .unwrap_or_else(|| "world".to_owned());
            let answer = serde_json::json!({ "greeting": format!("Hello, {name}!") }).to_string();
            let headers = Fields::new();
            let _ = headers.append("content-type", b"application/json");
            let response = OutgoingResponse::new(headers);
            let Ok(outgoing) = response.body() else {
                return;
            };
            ResponseOutparam::set(out, Ok(response));
            if let Ok(mut stream) = outgoing.write() {
                let _ = stream.write_all(answer.as_bytes());
                let _ = stream.flush();
            }
            let _ = OutgoingBody::finish(outgoing, None);
        }
    }
}
