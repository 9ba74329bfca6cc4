//! The HTTP client of the client subcommands: talks to a kiln server's
//! Lambda API and signs every request with SigV4 when credentials are found
//! (the standard AWS environment variables, else `KILN_ROOT_*`, else the root
//! key a local server generated in `$KILN_DATA_DIR/keys/root-credentials`).

use std::time::SystemTime;

use anyhow::{Context as _, Result, anyhow, bail};
use aws_credential_types::Credentials;
use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::identity::Identity;
use serde_json::Value;

/// Where the server is and how to reach it.
#[derive(Debug, clap::Args, Clone)]
pub struct Endpoint {
    /// The kiln server's URL.
    #[arg(long, env = "KILN_ENDPOINT", default_value = "http://127.0.0.1:9000")]
    pub endpoint: String,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// For people.
    Text,
    /// One JSON document, for scripts.
    Json,
}

/// A response from the API.
#[derive(Debug)]
pub struct ApiResponse {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
}

impl ApiResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn json(&self) -> Result<Value> {
        serde_json::from_slice(&self.body).context("the server's answer is not JSON")
    }

    /// Turns a Lambda error response into an error that reads like the AWS
    /// CLI's: `ResourceNotFoundException: Function not found: ...`.
    pub fn into_success(self) -> Result<Self> {
        if (200..300).contains(&self.status) {
            return Ok(self);
        }
        let kind = self
            .header("x-amzn-errortype")
            .unwrap_or("Error")
            .to_owned();
        let kind = kind.split(':').next().unwrap_or_default().to_owned();
        let message = serde_json::from_slice::<Value>(&self.body)
            .ok()
            .and_then(|v| {
                v.get("message")
                    .or_else(|| v.get("Message"))
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| String::from_utf8_lossy(&self.body).into_owned());
        Err(anyhow!("{kind} (HTTP {}): {message}", self.status))
    }
}

/// A signing client for one endpoint.
pub struct Client {
    base: String,
    http: reqwest::Client,
    credentials: Option<Credentials>,
    region: String,
}

impl Client {
    pub fn new(endpoint: &Endpoint) -> Result<Self> {
        let base = endpoint.endpoint.trim_end_matches('/').to_owned();
        let url = reqwest::Url::parse(&base).with_context(|| {
            format!("--endpoint {base:?} is not a URL (e.g. http://127.0.0.1:9000)")
        })?;
        if url.scheme() != "http" {
            bail!("--endpoint {base:?}: only http:// endpoints are supported by this kiln release");
        }
        Ok(Self {
            base,
            http: reqwest::Client::builder()
                .build()
                .context("creating the HTTP client")?,
            credentials: credentials_from_env(),
            region: std::env::var("AWS_REGION")
                .or_else(|_| std::env::var("AWS_DEFAULT_REGION"))
                .unwrap_or_else(|_| "us-east-1".to_owned()),
        })
    }

    /// Sends a request; `path_and_query` starts with `/`.
    pub async fn send(
        &self,
        method: reqwest::Method,
        path_and_query: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Result<ApiResponse> {
        let url = format!("{}{path_and_query}", self.base);
        let mut builder = http::Request::builder().method(method.as_str()).uri(&url);
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        if !body.is_empty() {
            builder = builder.header("content-type", "application/json");
        }
        let mut request = builder.body(body).context("building the request")?;
        if let Some(creds) = &self.credentials {
            self.sign(&mut request, creds)?;
        }
        // A large body goes up in chunks that move a progress bar.
        let (mut parts, mut body) = request.into_parts();
        let upload = if body.len() >= super::progress::LARGE_UPLOAD {
            parts
                .headers
                .insert(http::header::CONTENT_LENGTH, body.len().into());
            let label = format!("uploading {} KiB", body.len() / 1024);
            Some(super::progress::Upload::new(
                std::mem::take(&mut body),
                &label,
            ))
        } else {
            None
        };
        let mut request = reqwest::Request::try_from(http::Request::from_parts(parts, body))
            .context("building the request")?;
        if let Some(upload) = upload {
            *request.body_mut() = Some(reqwest::Body::wrap(upload));
        }
        let response = self.http.execute(request).await.map_err(|e| {
            anyhow!(
                "could not reach kiln at {}: {e}. Is `kiln serve` running there? \
                 (set --endpoint or KILN_ENDPOINT)",
                self.base
            )
        })?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response
            .bytes()
            .await
            .context("reading the server's answer")?
            .to_vec();
        Ok(ApiResponse {
            status,
            headers,
            body,
        })
    }

    fn sign(&self, request: &mut http::Request<Vec<u8>>, creds: &Credentials) -> Result<()> {
        let identity: Identity = creds.clone().into();
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.region)
            .name("lambda")
            .time(SystemTime::now())
            .settings(SigningSettings::default())
            .build()
            .context("signing parameters")?
            .into();
        let headers: Vec<(&str, &str)> = request
            .headers()
            .iter()
            .filter_map(|(k, v)| v.to_str().ok().map(|v| (k.as_str(), v)))
            .collect();
        let uri = request.uri().to_string();
        let signable = SignableRequest::new(
            request.method().as_str(),
            &uri,
            headers.into_iter(),
            SignableBody::Bytes(request.body()),
        )
        .context("preparing the request for signing")?;
        let (instructions, _signature) = sign(signable, &params)
            .context("signing the request")?
            .into_parts();
        instructions.apply_to_request_http1x(request);
        Ok(())
    }
}

fn credentials_from_env() -> Option<Credentials> {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    if let (Some(id), Some(secret)) = (var("AWS_ACCESS_KEY_ID"), var("AWS_SECRET_ACCESS_KEY")) {
        return Some(Credentials::new(
            id,
            secret,
            var("AWS_SESSION_TOKEN"),
            None,
            "environment",
        ));
    }
    if let (Some(id), Some(secret)) = (
        var("KILN_ROOT_ACCESS_KEY_ID"),
        var("KILN_ROOT_SECRET_ACCESS_KEY"),
    ) {
        return Some(Credentials::new(id, secret, None, None, "kiln-root"));
    }
    // The root key a local server generated in its data dir.
    let dir = var("KILN_DATA_DIR").unwrap_or_else(|| ".kiln".to_owned());
    let text =
        std::fs::read_to_string(std::path::Path::new(&dir).join("keys/root-credentials")).ok()?;
    let (id, secret) = kiln::auth::keys::parse_credentials_file(&text)?;
    Some(Credentials::new(id, secret, None, None, "kiln-data-dir"))
}

/// Percent-encodes a path segment (function names may be ARNs with ':').
pub fn path_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
