//! The runtimes catalogue: which runtime identifiers kiln accepts, how each
//! runs, and its lifecycle. As in Lambda, a deprecated runtime keeps
//! running the functions that use it; from its block dates on, functions
//! can no longer be created, then no longer updated, on it.

use time::Date;
use time::macros::date;

use super::ControlError;

/// How a runtime's code runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// A WebAssembly component (the `wasm` sandbox, or the agent's wasmtime).
    Wasm,
    /// A native `bootstrap` behind the Lambda Runtime API.
    Native,
}

/// One runtime identifier.
#[derive(Debug, Clone, Copy)]
pub struct RuntimeInfo {
    /// The identifier used in `Runtime`.
    pub id: &'static str,
    /// How it runs.
    pub family: Family,
    /// What it is.
    pub description: &'static str,
    /// The default `Handler`.
    pub default_handler: &'static str,
    /// From this date the runtime is deprecated.
    pub deprecation: Option<Date>,
    /// From this date no new function may use it.
    pub block_create: Option<Date>,
    /// From this date no function on it may be updated.
    pub block_update: Option<Date>,
}

/// The catalogue, after Lambda's schedule for the OS-only runtimes.
pub const CATALOGUE: &[RuntimeInfo] = &[
    RuntimeInfo {
        id: "wasip2",
        family: Family::Wasm,
        description: "WebAssembly component (WASI 0.2) implementing kiln:function",
        default_handler: "function.wasm",
        deprecation: None,
        block_create: None,
        block_update: None,
    },
    RuntimeInfo {
        id: "provided.al2023",
        family: Family::Native,
        description: "OS-only runtime: a bootstrap behind the Lambda Runtime API",
        default_handler: "bootstrap",
        deprecation: Some(date!(2029 - 06 - 30)),
        block_create: Some(date!(2029 - 07 - 31)),
        block_update: Some(date!(2029 - 08 - 31)),
    },
    RuntimeInfo {
        id: "provided.al2",
        family: Family::Native,
        description: "OS-only runtime (Amazon Linux 2 generation): a bootstrap behind the Lambda Runtime API",
        default_handler: "bootstrap",
        deprecation: Some(date!(2026 - 06 - 30)),
        block_create: Some(date!(2027 - 01 - 31)),
        block_update: Some(date!(2027 - 02 - 28)),
    },
    RuntimeInfo {
        id: "provided",
        family: Family::Native,
        description: "OS-only runtime (Amazon Linux 1 generation): a bootstrap behind the Lambda Runtime API",
        default_handler: "bootstrap",
        deprecation: Some(date!(2024 - 01 - 08)),
        block_create: Some(date!(2024 - 02 - 08)),
        block_update: Some(date!(2024 - 03 - 12)),
    },
];

/// Where a runtime is in its lifecycle on a given day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Fully supported.
    Supported,
    /// Deprecated: still created and updated, but plan to move.
    Deprecated,
    /// No new functions.
    CreateBlocked,
    /// No new functions and no updates.
    UpdateBlocked,
}

impl State {
    /// As `kiln runtimes` prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Supported => "supported",
            State::Deprecated => "deprecated",
            State::CreateBlocked => "deprecated (create blocked)",
            State::UpdateBlocked => "deprecated (create and update blocked)",
        }
    }
}

impl RuntimeInfo {
    /// The state on `day`.
    pub fn state_on(&self, day: Date) -> State {
        let reached = |d: Option<Date>| d.is_some_and(|d| day >= d);
        if reached(self.block_update) {
            State::UpdateBlocked
        } else if reached(self.block_create) {
            State::CreateBlocked
        } else if reached(self.deprecation) {
            State::Deprecated
        } else {
            State::Supported
        }
    }
}

/// A runtime's catalogue entry.
pub fn lookup(id: &str) -> Option<&'static RuntimeInfo> {
    CATALOGUE.iter().find(|r| r.id == id)
}

fn today() -> Date {
    time::OffsetDateTime::now_utc().date()
}

fn unknown(id: &str) -> ControlError {
    let ids: Vec<&str> = CATALOGUE.iter().map(|r| r.id).collect();
    ControlError::InvalidParameter(format!(
        "The runtime parameter of {id} is not supported by kiln; supported runtimes are {} \
         (see `kiln runtimes`)",
        ids.join(", ")
    ))
}

fn blocked(id: &str) -> ControlError {
    ControlError::InvalidParameter(format!(
        "The runtime parameter of {id} is no longer supported for creating or updating AWS \
         Lambda functions. We recommend you use a supported runtime while creating or updating \
         functions."
    ))
}

/// Whether a new function may use `id` on `day`.
pub fn check_create_on(id: &str, day: Date) -> Result<&'static RuntimeInfo, ControlError> {
    let info = lookup(id).ok_or_else(|| unknown(id))?;
    match info.state_on(day) {
        State::Supported | State::Deprecated => Ok(info),
        State::CreateBlocked | State::UpdateBlocked => Err(blocked(id)),
    }
}

/// Whether a function on `id` may be updated on `day`.
pub fn check_update_on(id: &str, day: Date) -> Result<&'static RuntimeInfo, ControlError> {
    let info = lookup(id).ok_or_else(|| unknown(id))?;
    match info.state_on(day) {
        State::UpdateBlocked => Err(blocked(id)),
        _ => Ok(info),
    }
}

/// [`check_create_on`] today.
pub fn check_create(id: &str) -> Result<&'static RuntimeInfo, ControlError> {
    check_create_on(id, today())
}

/// [`check_update_on`] today.
pub fn check_update(id: &str) -> Result<&'static RuntimeInfo, ControlError> {
    check_update_on(id, today())
}

/// The default `Handler` of a runtime.
pub fn default_handler(id: &str) -> &'static str {
    lookup(id).map_or("function.wasm", |r| r.default_handler)
}

/// The catalogue as rows for `kiln runtimes`, on `day`.
pub fn table(day: Date) -> Vec<[String; 6]> {
    let fmt = |d: Option<Date>| d.map_or("-".to_owned(), |d| d.to_string());
    CATALOGUE
        .iter()
        .map(|r| {
            [
                r.id.to_owned(),
                r.state_on(day).as_str().to_owned(),
                fmt(r.deprecation),
                fmt(r.block_create),
                fmt(r.block_update),
                r.description.to_owned(),
            ]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifecycle_by_date() {
        let al2 = lookup("provided.al2").unwrap();
        assert_eq!(al2.state_on(date!(2026 - 01 - 01)), State::Supported);
        assert_eq!(al2.state_on(date!(2026 - 07 - 01)), State::Deprecated);
        assert_eq!(al2.state_on(date!(2027 - 02 - 01)), State::CreateBlocked);
        assert_eq!(al2.state_on(date!(2027 - 03 - 01)), State::UpdateBlocked);
    }

    #[test]
    fn create_and_update_are_refused_as_lambda_does() {
        let day = date!(2026 - 11 - 23);
        check_create_on("wasip2", day).unwrap();
        check_create_on("provided.al2023", day).unwrap();
        check_create_on("provided.al2", day).unwrap();
        let e = check_create_on("provided", day).unwrap_err().to_string();
        assert!(
            e.contains("no longer supported for creating or updating"),
            "{e}"
        );
        assert!(check_update_on("provided", day).is_err());
        let later = date!(2027 - 02 - 01);
        assert!(check_create_on("provided.al2", later).is_err());
        check_update_on("provided.al2", later).unwrap();
        assert!(
            check_create_on("python3.12", day)
                .unwrap_err()
                .to_string()
                .contains("not supported by kiln")
        );
    }
}
