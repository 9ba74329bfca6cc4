//! Calling kiln's Lambda API from inside a function: [`Client::from_env`]
//! reads what kiln gives every environment whose function has an execution
//! role (`AWS_ENDPOINT_URL_LAMBDA`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`), and [`Client::invoke`]
//! sends a SigV4-signed `Invoke`. What the call may do is exactly what the
//! role's policy allows; kiln checks it like any other request.
//!
//! ```no_run
//! # fn main() -> Result<(), kiln_sdk::lambda::ClientError> {
//! let client = kiln_sdk::lambda::Client::from_env()?;
//! let out = client.invoke("resize-image", br#"{"width": 64}"#)?;
//! if out.function_error.is_none() {
//!     println!("{}", String::from_utf8_lossy(&out.payload));
//! }
//! # Ok(())
//! # }
//! ```
//!
//! In a Wasm function the request goes out through `wasi:http`, which kiln
//! allows to its own endpoint only; in a native one, over TCP to the
//! environment's relay.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::clock::Utc;

/// What went wrong with a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientError {
    /// The environment lacks what a call needs (no execution role, ...).
    Config(String),
    /// The request did not get an answer.
    Transport(String),
    /// kiln answered with an error (`AccessDeniedException`, ...).
    Api {
        /// The HTTP status.
        status: u16,
        /// Lambda's error type, from `x-amzn-ErrorType` or the body.
        error_type: String,
        /// The message kiln gave.
        message: String,
    },
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Config(m) => write!(f, "{m}"),
            ClientError::Transport(m) => write!(f, "calling kiln: {m}"),
            ClientError::Api {
                status,
                error_type,
                message,
            } => write!(f, "{error_type} ({status}): {message}"),
        }
    }
}

impl std::error::Error for ClientError {}

/// The answer to a synchronous invoke.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvokeOutput {
    /// 200 for a synchronous invoke that ran.
    pub status: u16,
    /// `Unhandled` when the function failed; the payload is then its error.
    pub function_error: Option<String>,
    /// The version that ran.
    pub executed_version: Option<String>,
    /// The function's response, or its error document.
    pub payload: Vec<u8>,
}

/// Credentials that sign requests.
#[derive(Clone)]
pub struct Credentials {
    /// `ASIA...` for a role session, `AKIA...` for a key.
    pub access_key_id: String,
    /// The secret; never printed by `Debug`.
    pub secret_access_key: String,
    /// The session token of temporary credentials.
    pub session_token: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// A client of kiln's Lambda API.
#[derive(Debug, Clone)]
pub struct Client {
    /// `host:port` of the API, as the `Host` header names it.
    authority: String,
    region: String,
    credentials: Credentials,
}

impl Client {
    /// A client configured by the environment kiln set up.
    pub fn from_env() -> Result<Self, ClientError> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let endpoint = var("AWS_ENDPOINT_URL_LAMBDA").ok_or_else(|| {
            ClientError::Config(
                "AWS_ENDPOINT_URL_LAMBDA is not set: this environment has no way to reach kiln"
                    .into(),
            )
        })?;
        let missing = |name: &str| {
            ClientError::Config(format!(
                "{name} is not set: give the function an execution role (its Role names a \
                 kiln role) to call kiln from it"
            ))
        };
        let credentials = Credentials {
            access_key_id: var("AWS_ACCESS_KEY_ID").ok_or_else(|| missing("AWS_ACCESS_KEY_ID"))?,
            secret_access_key: var("AWS_SECRET_ACCESS_KEY")
                .ok_or_else(|| missing("AWS_SECRET_ACCESS_KEY"))?,
            session_token: var("AWS_SESSION_TOKEN"),
        };
        let region = var("AWS_REGION").unwrap_or_else(|| "us-east-1".to_owned());
        Self::new(&endpoint, &region, credentials)
    }

    /// A client of the API at `endpoint` (`http://host:port`).
    pub fn new(
        endpoint: &str,
        region: &str,
        credentials: Credentials,
    ) -> Result<Self, ClientError> {
        let authority = endpoint
            .strip_prefix("http://")
            .map(|rest| rest.trim_end_matches('/'))
            .filter(|a| !a.is_empty() && !a.contains('/'))
            .ok_or_else(|| {
                ClientError::Config(format!(
                    "the endpoint {endpoint:?} is not of the form http://host:port"
                ))
            })?;
        Ok(Self {
            authority: authority.to_owned(),
            region: region.to_owned(),
            credentials,
        })
    }

    /// The same credentials against another endpoint.
    pub fn at(self, endpoint: &str) -> Result<Self, ClientError> {
        Self::new(endpoint, &self.region, self.credentials)
    }

    /// Invokes `function_name` (a name, `name:qualifier` or an ARN)
    /// synchronously with `payload` and waits for its answer.
    pub fn invoke(&self, function_name: &str, payload: &[u8]) -> Result<InvokeOutput, ClientError> {
        let path = format!(
            "/2015-03-31/functions/{}/invocations",
            uri_encode(function_name, true)
        );
        let headers = self.sign("POST", &path, payload, Utc::now());
        let response = transport::send(&Request {
            authority: &self.authority,
            method: "POST",
            path: &path,
            headers: &headers,
            body: payload,
        })?;
        let header = |name: &str| {
            response
                .headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        };
        if response.status >= 300 {
            let body: serde_json::Value =
                serde_json::from_slice(&response.body).unwrap_or_default();
            let field = |names: &[&str]| {
                names
                    .iter()
                    .find_map(|n| body.get(*n).and_then(|v| v.as_str()))
                    .map(str::to_owned)
            };
            let error_type = header("x-amzn-ErrorType")
                .map(|t| t.split(':').next().unwrap_or_default().to_owned())
                .or_else(|| field(&["__type", "Type"]))
                .unwrap_or_else(|| "ServiceException".to_owned());
            return Err(ClientError::Api {
                status: response.status,
                error_type,
                message: field(&["message", "Message"]).unwrap_or_default(),
            });
        }
        Ok(InvokeOutput {
            status: response.status,
            function_error: header("X-Amz-Function-Error"),
            executed_version: header("X-Amz-Executed-Version"),
            payload: response.body,
        })
    }

    /// The headers of a request signed with SigV4 for `lambda`, `Host`
    /// included (a `wasi:http` guest may not set it; the host sets the same
    /// value from the authority).
    fn sign(&self, method: &str, path: &str, body: &[u8], now: Utc) -> Vec<(String, String)> {
        sign_v4(&SignInput {
            method,
            path,
            host: &self.authority,
            body,
            credentials: &self.credentials,
            region: &self.region,
            service: "lambda",
            now,
        })
    }
}

struct SignInput<'a> {
    method: &'a str,
    /// The path as sent (already percent-encoded).
    path: &'a str,
    host: &'a str,
    body: &'a [u8],
    credentials: &'a Credentials,
    region: &'a str,
    service: &'a str,
    now: Utc,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

/// Percent-encodes everything but RFC 3986's unreserved characters; `/`
/// too when `encode_slash` (a path segment), not otherwise (a whole path).
fn uri_encode(s: &str, encode_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char);
            }
            b'/' if !encode_slash => out.push('/'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// The headers SigV4 signs, in canonical order: `host`, the payload hash,
/// the date and, for temporary credentials, the session token.
fn signed_headers(input: &SignInput<'_>) -> Vec<(String, String)> {
    let mut headers: Vec<(String, String)> = vec![
        ("host".into(), input.host.to_owned()),
        (
            "x-amz-content-sha256".into(),
            hex(&Sha256::digest(input.body)),
        ),
        ("x-amz-date".into(), input.now.basic_date_time()),
    ];
    if let Some(token) = &input.credentials.session_token {
        headers.push(("x-amz-security-token".into(), token.clone()));
    }
    headers
}

/// The canonical request of a request with no query string: Lambda's
/// canonical URI encodes the path as sent once more.
fn canonical_request(input: &SignInput<'_>, headers: &[(String, String)]) -> String {
    let names = headers.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>();
    let canonical_headers: String = headers
        .iter()
        .map(|(k, v)| format!("{k}:{}\n", v.trim()))
        .collect();
    format!(
        "{}\n{}\n\n{canonical_headers}\n{}\n{}",
        input.method,
        uri_encode(input.path, false),
        names.join(";"),
        hex(&Sha256::digest(input.body)),
    )
}

/// Signs with SigV4: the request's headers plus `authorization`.
fn sign_v4(input: &SignInput<'_>) -> Vec<(String, String)> {
    let mut headers = signed_headers(input);
    let canonical = canonical_request(input, &headers);
    let date = input.now.basic_date();
    let scope = format!("{date}/{}/{}/aws4_request", input.region, input.service);
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{}\n{scope}\n{}",
        input.now.basic_date_time(),
        hex(&Sha256::digest(canonical.as_bytes()))
    );
    let mut key = hmac(
        format!("AWS4{}", input.credentials.secret_access_key).as_bytes(),
        date.as_bytes(),
    );
    for part in [input.region, input.service, "aws4_request"] {
        key = hmac(&key, part.as_bytes());
    }
    let signature = hex(&hmac(&key, string_to_sign.as_bytes()));
    let names = headers
        .iter()
        .map(|(k, _)| k.as_str())
        .collect::<Vec<_>>()
        .join(";");
    headers.push((
        "authorization".into(),
        format!(
            "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={names}, Signature={signature}",
            input.credentials.access_key_id
        ),
    ));
    headers
}

/// Largest response read: Lambda's synchronous payload limit and room.
const MAX_RESPONSE: usize = 7 << 20;

/// A signed request, ready to send.
#[derive(Clone, Copy)]
struct Request<'a> {
    authority: &'a str,
    method: &'a str,
    path: &'a str,
    headers: &'a [(String, String)],
    body: &'a [u8],
}

/// A response as the client needs it.
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

#[cfg(not(target_family = "wasm"))]
mod transport {
    use std::io::Read;

    use super::{ClientError, MAX_RESPONSE, Request, Response};

    pub(super) fn send(request: &Request<'_>) -> Result<Response, ClientError> {
        let Request {
            authority,
            method,
            path,
            headers,
            body,
        } = *request;
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .new_agent();
        let mut request = ureq::http::Request::builder()
            .method(method)
            .uri(format!("http://{authority}{path}"));
        for (k, v) in headers.iter().filter(|(k, _)| k != "host") {
            request = request.header(k, v);
        }
        let request = request
            .body(body.to_vec())
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        let mut response = agent
            .run(request)
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        let status = response.status().as_u16();
        let headers = response
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let mut body = Vec::new();
        response
            .body_mut()
            .as_reader()
            .take(MAX_RESPONSE as u64)
            .read_to_end(&mut body)
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        Ok(Response {
            status,
            headers,
            body,
        })
    }
}

#[cfg(target_family = "wasm")]
mod transport {
    use wasi::http::outgoing_handler;
    use wasi::http::types::{Fields, Method, OutgoingBody, OutgoingRequest, Scheme};
    use wasi::io::streams::StreamError;

    use super::{ClientError, MAX_RESPONSE, Request, Response};

    fn fail(what: &str) -> impl Fn(String) -> ClientError + '_ {
        move |e| ClientError::Transport(format!("{what}: {e}"))
    }

    pub(super) fn send(request: &Request<'_>) -> Result<Response, ClientError> {
        let Request {
            authority,
            method,
            path,
            headers,
            body,
        } = *request;
        // The host sets `Host` from the authority; a guest may not.
        let fields: Vec<(String, Vec<u8>)> = headers
            .iter()
            .filter(|(k, _)| k != "host")
            .map(|(k, v)| (k.clone(), v.as_bytes().to_vec()))
            .collect();
        let fields = Fields::from_list(&fields).map_err(|e| fail("headers")(format!("{e:?}")))?;
        let request = OutgoingRequest::new(fields);
        let method = match method {
            "GET" => Method::Get,
            "POST" => Method::Post,
            "PUT" => Method::Put,
            "DELETE" => Method::Delete,
            other => Method::Other(other.to_owned()),
        };
        let unit = |what: &'static str| move |()| ClientError::Transport(format!("{what} refused"));
        request.set_method(&method).map_err(unit("method"))?;
        request
            .set_scheme(Some(&Scheme::Http))
            .map_err(unit("scheme"))?;
        request
            .set_authority(Some(authority))
            .map_err(unit("authority"))?;
        request
            .set_path_with_query(Some(path))
            .map_err(unit("path"))?;
        let outgoing = request.body().map_err(unit("body"))?;
        let pending = outgoing_handler::handle(request, None)
            .map_err(|e| fail("sending")(format!("{e:?}")))?;
        let written = (|| {
            {
                let stream = outgoing.write().map_err(unit("body stream"))?;
                for chunk in body.chunks(4096) {
                    stream
                        .blocking_write_and_flush(chunk)
                        .map_err(|e| fail("writing the body")(format!("{e:?}")))?;
                }
            }
            OutgoingBody::finish(outgoing, None)
                .map_err(|e| fail("finishing the body")(format!("{e:?}")))
        })();
        pending.subscribe().block();
        if let Err(write_error) = written {
            // A request refused before its body was taken closes the body:
            // the refusal is the error to report.
            return Err(match pending.get() {
                Some(Ok(Err(e))) => fail("response")(format!("{e:?}")),
                _ => write_error,
            });
        }
        let response = pending
            .get()
            .ok_or_else(|| ClientError::Transport("no response".into()))?
            .map_err(unit("response"))?
            .map_err(|e| fail("response")(format!("{e:?}")))?;
        let status = response.status();
        let headers = response
            .headers()
            .entries()
            .into_iter()
            .map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned()))
            .collect();
        let incoming = response.consume().map_err(unit("response body"))?;
        let stream = incoming.stream().map_err(unit("response body"))?;
        let mut body = Vec::new();
        loop {
            match stream.blocking_read(64 * 1024) {
                Ok(bytes) => {
                    if body.len() + bytes.len() > MAX_RESPONSE {
                        return Err(ClientError::Transport(
                            "the response is larger than 7 MiB".into(),
                        ));
                    }
                    body.extend_from_slice(&bytes);
                }
                Err(StreamError::Closed) => break,
                Err(StreamError::LastOperationFailed(e)) => {
                    return Err(fail("reading the response")(e.to_debug_string()));
                }
            }
        }
        Ok(Response {
            status,
            headers,
            body,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn credentials(id: &str, secret: &str, token: Option<&str>) -> Credentials {
        Credentials {
            access_key_id: id.into(),
            secret_access_key: secret.into(),
            session_token: token.map(Into::into),
        }
    }

    /// The SigV4 suite's `double-encode-path` case: the canonical URI encodes
    /// the path as sent once more.
    #[test]
    fn canonical_uri_double_encodes() {
        let creds = credentials("ANOTREAL", "secret", None);
        let input = SignInput {
            method: "POST",
            path: "/test/@connections/JBDvjfGEIAMCERw%3D",
            host: "tj9n5r0m12.execute-api.us-east-1.amazonaws.com",
            body: b"",
            credentials: &creds,
            region: "us-east-1",
            service: "service",
            now: Utc::from_unix_millis(1_620_747_645_000),
        };
        let expected = "POST\n/test/%40connections/JBDvjfGEIAMCERw%253D\n\n\
            host:tj9n5r0m12.execute-api.us-east-1.amazonaws.com\n\
            x-amz-content-sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855\n\
            x-amz-date:20210511T154045Z\n\n\
            host;x-amz-content-sha256;x-amz-date\n\
            e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        assert_eq!(canonical_request(&input, &signed_headers(&input)), expected);
    }

    /// A signature computed independently, by botocore's SigV4Auth, for the
    /// same request, key and time.
    #[test]
    fn signature_matches_botocore() {
        let creds = credentials(
            "ASIAEXAMPLE",
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            Some("token-1"),
        );
        let signed = sign_v4(&SignInput {
            method: "POST",
            path: "/2015-03-31/functions/target%3Alive/invocations",
            host: "127.0.0.1:9002",
            body: b"{\"a\":1}",
            credentials: &creds,
            region: "us-east-1",
            service: "lambda",
            now: Utc::from_unix_millis(1_440_938_160_000),
        });
        let auth = &signed.last().unwrap().1;
        assert_eq!(auth, BOTOCORE_AUTHORIZATION);
    }

    const BOTOCORE_AUTHORIZATION: &str = "AWS4-HMAC-SHA256 \
        Credential=ASIAEXAMPLE/20150830/us-east-1/lambda/aws4_request, \
        SignedHeaders=host;x-amz-content-sha256;x-amz-date;x-amz-security-token, \
        Signature=e6231d8aeb9bfde0d3f413983d83675cccd0362fd04f9a0048cf2bd7187acb0e";

    #[test]
    fn endpoints_must_be_plain_http_authorities() {
        let creds = credentials("a", "b", None);
        assert!(Client::new("http://127.0.0.1:9002", "us-east-1", creds.clone()).is_ok());
        assert!(Client::new("http://127.0.0.1:9002/", "us-east-1", creds.clone()).is_ok());
        for bad in ["https://x", "127.0.0.1:9002", "http://", "http://h/p"] {
            assert!(
                Client::new(bad, "us-east-1", creds.clone()).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn names_are_encoded_in_the_path() {
        assert_eq!(uri_encode("f:live", true), "f%3Alive");
        assert_eq!(
            uri_encode("arn:aws:lambda:us-east-1:000000000000:function:f", true),
            "arn%3Aaws%3Alambda%3Aus-east-1%3A000000000000%3Afunction%3Af"
        );
        assert_eq!(uri_encode("/a b/", false), "/a%20b/");
    }

    #[test]
    fn secrets_stay_out_of_debug() {
        let c = credentials("AKID", "very-secret", Some("tok"));
        assert!(!format!("{c:?}").contains("very-secret"));
    }
}
