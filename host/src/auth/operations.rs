//! Which IAM action each API route is, and on which resource: the link
//! between a request and the policies that govern it.
//!
//! Actions are Lambda's (`lambda:InvokeFunction`, ...) for Lambda's API and
//! `kiln:*` for kiln's own endpoints. Resources are ARNs; a function named
//! with a qualifier (in the name or in `Qualifier`) is the qualified ARN, as
//! in Lambda, so `function:f` in a policy does not cover `function:f:prod`.

use crate::control::model::ArnContext;
use crate::control::names::parse_function_ref;

/// One API operation as authorization sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operation {
    /// The operation's name (`CreateFunction`); the audit trail's `action`.
    pub name: &'static str,
    /// The IAM action (`lambda:CreateFunction`).
    pub action: String,
    /// The resource ARN, or `*`.
    pub resource: String,
    /// The function named, for resource policies and audit filters.
    pub function: Option<String>,
    /// The qualifier named (resource policies are kept per qualifier).
    pub qualifier: Option<String>,
    /// Whether the operation changes state (audited with its parameters).
    pub mutating: bool,
}

/// The operation of a routed request: `method`, the route's pattern,
/// its path parameters, the query's `Qualifier`, and for `CreateFunction`
/// the body's `FunctionName`.
pub fn operation(
    method: &str,
    route: &str,
    params: &[(&str, &str)],
    qualifier: Option<&str>,
    body_function: Option<&str>,
    arn: &ArnContext,
) -> Option<Operation> {
    let param = |k: &str| params.iter().find(|(n, _)| *n == k).map(|(_, v)| *v);
    let tail = route
        .strip_prefix("/2015-03-31/functions/{name}")
        .or_else(|| route.strip_prefix("/2017-10-31/functions/{name}"))
        .or_else(|| route.strip_prefix("/2019-09-30/functions/{name}"))
        .or_else(|| route.strip_prefix("/2019-09-25/functions/{name}"))
        .or_else(|| route.strip_prefix("/kiln/functions/{name}"));
    let (name, resource): (&'static str, Resource) = match (method, route, tail) {
        ("POST", "/2015-03-31/functions", _) => {
            ("CreateFunction", Resource::Function(body_function, None))
        }
        ("GET", "/2015-03-31/functions" | "/2015-03-31/functions/", _) => {
            ("ListFunctions", Resource::Any)
        }
        ("GET", "/2016-08-19/account-settings" | "/2016-08-19/account-settings/", _) => {
            ("GetAccountSettings", Resource::Any)
        }
        ("GET", "/2018-10-31/layers" | "/2018-10-31/layers/", _) => ("ListLayers", Resource::Any),
        (m, _, Some(tail)) => {
            let f = Resource::Function(param("name"), qualifier);
            // Operations on the whole function: a qualifier in the name is
            // ignored by their handlers, so it must not narrow the resource.
            let unq = Resource::Unqualified(param("name"));
            match (m, tail, route.get(..11)) {
                ("GET", "", _) => ("GetFunction", f),
                ("DELETE", "", _) => ("DeleteFunction", f),
                ("GET", "/configuration", _) => ("GetFunctionConfiguration", f),
                ("PUT", "/configuration", _) => ("UpdateFunctionConfiguration", unq),
                ("PUT", "/code", _) => ("UpdateFunctionCode", unq),
                ("POST", "/invocations", _) => ("InvokeFunction", f),
                ("POST", "/versions", _) => ("PublishVersion", unq),
                ("GET", "/versions", _) => ("ListVersionsByFunction", unq),
                ("POST", "/aliases", _) => ("CreateAlias", unq),
                ("GET", "/aliases", _) => ("ListAliases", unq),
                (_, "/aliases/{alias}", _) => {
                    let op = match m {
                        "GET" => "GetAlias",
                        "PUT" => "UpdateAlias",
                        _ => "DeleteAlias",
                    };
                    (op, Resource::Function(param("name"), param("alias")))
                }
                ("POST", "/policy", _) => ("AddPermission", f),
                ("GET", "/policy", _) => ("GetPolicy", f),
                ("DELETE", "/policy/{sid}", _) => ("RemovePermission", f),
                ("PUT", "/concurrency", _) => ("PutFunctionConcurrency", unq),
                ("DELETE", "/concurrency", _) => ("DeleteFunctionConcurrency", unq),
                ("GET", "/concurrency", _) => ("GetFunctionConcurrency", unq),
                ("PUT", "/provisioned-concurrency", _) => ("PutProvisionedConcurrencyConfig", f),
                ("DELETE", "/provisioned-concurrency", _) => {
                    ("DeleteProvisionedConcurrencyConfig", f)
                }
                ("GET", "/provisioned-concurrency", _) if qualifier.is_some() => {
                    ("GetProvisionedConcurrencyConfig", f)
                }
                ("GET", "/provisioned-concurrency", _) => {
                    ("ListProvisionedConcurrencyConfigs", unq)
                }
                ("PUT", "/event-invoke-config", _) => ("PutFunctionEventInvokeConfig", f),
                ("POST", "/event-invoke-config", _) => ("UpdateFunctionEventInvokeConfig", f),
                ("GET", "/event-invoke-config", _) => ("GetFunctionEventInvokeConfig", f),
                ("DELETE", "/event-invoke-config", _) => ("DeleteFunctionEventInvokeConfig", f),
                ("GET", "/event-invoke-config/list", _) => ("ListFunctionEventInvokeConfigs", unq),
                ("GET", "/code.zip", _) => ("GetFunction", f),
                ("GET", "/config-history", _) => ("GetConfigurationHistory", unq),
                ("GET", "/logs", _) => ("GetFunctionLogs", unq),
                ("GET", "/activity", _) => ("GetFunctionActivity", unq),
                _ => return None,
            }
        }
        (m, "/2017-03-31/tags/{arn}", _) => {
            let op = match m {
                "POST" => "TagResource",
                "GET" => "ListTags",
                _ => "UntagResource",
            };
            (op, Resource::Arn(param("arn")))
        }
        (m, "/2018-10-31/layers/{layer}/versions", _) => {
            let op = if m == "POST" {
                "PublishLayerVersion"
            } else {
                "ListLayerVersions"
            };
            (op, Resource::Layer(param("layer"), None))
        }
        (m, "/2018-10-31/layers/{layer}/versions/{version}", _) => {
            let op = if m == "DELETE" {
                "DeleteLayerVersion"
            } else {
                "GetLayerVersion"
            };
            (op, Resource::Layer(param("layer"), param("version")))
        }
        (m, "/2018-10-31/layers/{layer}/versions/{version}/policy", _) => {
            let op = if m == "POST" {
                "AddLayerVersionPermission"
            } else {
                "GetLayerVersionPolicy"
            };
            (op, Resource::Layer(param("layer"), param("version")))
        }
        ("DELETE", "/2018-10-31/layers/{layer}/versions/{version}/policy/{sid}", _) => (
            "RemoveLayerVersionPermission",
            Resource::Layer(param("layer"), param("version")),
        ),
        ("GET", "/kiln/layers/{layer}/{version}/content.zip", _) => (
            "GetLayerVersion",
            Resource::Layer(param("layer"), param("version")),
        ),
        ("GET", "/kiln/queue/{name}/records", _) => {
            ("ListQueueRecords", Resource::Queue(param("name")))
        }
        ("GET", "/kiln/queue/{name}/records/{id}", _) => {
            ("GetQueueRecord", Resource::Queue(param("name")))
        }
        ("POST", "/kiln/queue/{name}/redrive", _) => {
            ("RedriveQueue", Resource::Queue(param("name")))
        }
        ("POST", "/kiln/keys", _) => ("CreateAccessKey", Resource::Any),
        ("GET", "/kiln/keys", _) => ("ListAccessKeys", Resource::Any),
        ("DELETE", "/kiln/keys/{id}", _) => ("DeleteAccessKey", Resource::Any),
        ("POST", "/kiln/roles", _) => ("CreateRole", Resource::Any),
        ("GET", "/kiln/roles", _) => ("ListRoles", Resource::Any),
        ("DELETE", "/kiln/roles/{role}", _) => ("DeleteRole", Resource::Any),
        ("POST", "/kiln/roles/{role}/revoke-sessions", _) => ("RevokeRoleSessions", Resource::Any),
        ("POST", "/kiln/master-key/rotate", _) => ("RotateMasterKey", Resource::Any),
        _ => return None,
    };
    let service = if KILN_OPERATIONS.contains(&name) {
        "kiln"
    } else {
        "lambda"
    };
    let (resource, function, qualifier) = resource.arn(arn);
    Some(Operation {
        name,
        action: format!("{service}:{name}"),
        resource,
        function,
        qualifier,
        mutating: !(name.starts_with("Get") || name.starts_with("List")),
    })
}

/// Operations of kiln's own API (`kiln:` actions).
const KILN_OPERATIONS: &[&str] = &[
    "GetConfigurationHistory",
    "GetFunctionLogs",
    "GetFunctionActivity",
    "ListQueueRecords",
    "GetQueueRecord",
    "RedriveQueue",
    "CreateAccessKey",
    "ListAccessKeys",
    "DeleteAccessKey",
    "CreateRole",
    "ListRoles",
    "DeleteRole",
    "RevokeRoleSessions",
    "RotateMasterKey",
];

enum Resource<'a> {
    Any,
    /// A function as named by the caller, and a qualifier.
    Function(Option<&'a str>, Option<&'a str>),
    /// A function as a whole, whatever qualifier its name carries.
    Unqualified(Option<&'a str>),
    /// A layer name (or ARN) and a version.
    Layer(Option<&'a str>, Option<&'a str>),
    Queue(Option<&'a str>),
    Arn(Option<&'a str>),
}

impl Resource<'_> {
    fn arn(&self, ctx: &ArnContext) -> (String, Option<String>, Option<String>) {
        let base = format!("arn:aws:lambda:{}:{}", ctx.region, ctx.account_id);
        match self {
            Resource::Any => ("*".to_owned(), None, None),
            Resource::Unqualified(name) => {
                let raw = name.unwrap_or("");
                let name = parse_function_ref(raw, ctx).map_or_else(|_| raw.to_owned(), |r| r.name);
                (format!("{base}:function:{name}"), Some(name), None)
            }
            Resource::Function(name, qualifier) => {
                let raw = name.unwrap_or("");
                // A name the API will refuse anyway is still given a
                // precise resource, so that a policy cannot be dodged by
                // spelling.
                let (name, in_name) = match parse_function_ref(raw, ctx) {
                    Ok(r) => (r.name, r.qualifier),
                    Err(_) => (raw.to_owned(), None),
                };
                let qualifier = qualifier.map(str::to_owned).or(in_name);
                let arn = match &qualifier {
                    Some(q) => format!("{base}:function:{name}:{q}"),
                    None => format!("{base}:function:{name}"),
                };
                (arn, Some(name), qualifier)
            }
            Resource::Layer(layer, version) => {
                let layer = layer.unwrap_or("");
                let layer = layer.rsplit(':').next().unwrap_or(layer);
                match version {
                    Some(v) => (format!("{base}:layer:{layer}:{v}"), None, None),
                    None => (format!("{base}:layer:{layer}"), None, None),
                }
            }
            Resource::Queue(name) => (
                format!(
                    "arn:aws:kiln:{}:{}:queue:{}",
                    ctx.region,
                    ctx.account_id,
                    name.unwrap_or("")
                ),
                None,
                None,
            ),
            Resource::Arn(arn) => {
                let arn = arn.unwrap_or("");
                let function = arn
                    .split(':')
                    .nth(6)
                    .filter(|_| arn.contains(":function:"))
                    .map(str::to_owned);
                (arn.to_owned(), function, None)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> ArnContext {
        ArnContext {
            region: "us-east-1".to_owned(),
            account_id: "000000000000".to_owned(),
        }
    }

    #[test]
    fn routes_map_to_actions_and_resources() {
        let op = operation(
            "POST",
            "/2015-03-31/functions/{name}/invocations",
            &[("name", "hello")],
            Some("prod"),
            None,
            &ctx(),
        )
        .unwrap();
        assert_eq!(op.action, "lambda:InvokeFunction");
        assert_eq!(
            op.resource,
            "arn:aws:lambda:us-east-1:000000000000:function:hello:prod"
        );
        assert!(op.mutating);

        let op = operation(
            "GET",
            "/2015-03-31/functions/{name}",
            &[("name", "arn:aws:lambda:us-east-1:000000000000:function:f:3")],
            None,
            None,
            &ctx(),
        )
        .unwrap();
        assert_eq!(op.action, "lambda:GetFunction");
        assert_eq!(
            op.resource,
            "arn:aws:lambda:us-east-1:000000000000:function:f:3"
        );
        assert!(!op.mutating);

        let op = operation(
            "POST",
            "/2015-03-31/functions",
            &[],
            None,
            Some("new"),
            &ctx(),
        )
        .unwrap();
        assert_eq!(op.action, "lambda:CreateFunction");
        assert_eq!(op.function.as_deref(), Some("new"));

        // A qualifier in the name does not narrow an operation on the whole
        // function (an alias grant must not publish versions).
        for (method, route) in [
            ("POST", "/2015-03-31/functions/{name}/versions"),
            ("POST", "/2015-03-31/functions/{name}/aliases"),
            ("GET", "/kiln/functions/{name}/config-history"),
        ] {
            let op = operation(method, route, &[("name", "app:dev")], None, None, &ctx()).unwrap();
            assert_eq!(
                op.resource, "arn:aws:lambda:us-east-1:000000000000:function:app",
                "{route}"
            );
            assert_eq!(op.qualifier, None);
        }

        let op = operation("POST", "/kiln/keys", &[], None, None, &ctx()).unwrap();
        assert_eq!(op.action, "kiln:CreateAccessKey");
        assert_eq!(op.resource, "*");

        assert!(operation("PATCH", "/nowhere", &[], None, None, &ctx()).is_none());
    }
}
