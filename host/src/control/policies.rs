//! Function resource policies: `AddPermission`, `GetPolicy`,
//! `RemovePermission`, per function and per qualifier, stored as the
//! statements of Lambda's policy document (evaluated by the authorization
//! layer).

use serde_json::{Value, json};

use super::layers::MAX_POLICY;
use super::model::PolicyRecord;
use super::names::FunctionRef;
use super::requests::AddPermissionRequest;
use super::{ControlError, ControlPlane, check_revision};
use crate::store::meta::Kind;

/// Statement ids: 1-100 of `[a-zA-Z0-9-_]`.
pub(super) fn check_statement_id(sid: &str) -> Result<(), ControlError> {
    let ok = !sid.is_empty()
        && sid.len() <= 100
        && sid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !ok {
        return Err(super::names::pattern_error(
            "statementId",
            sid,
            "([a-zA-Z0-9-_]+)",
        ));
    }
    Ok(())
}

/// Adds a statement, refusing a duplicate id or a document over the limit;
/// gives the policy a new revision.
pub(super) fn add_statement(
    policy: &mut PolicyRecord,
    statement: Value,
    sid: &str,
) -> Result<(), ControlError> {
    if policy.statements.iter().any(|s| s["Sid"] == sid) {
        return Err(ControlError::Conflict(format!(
            "The statement id ({sid}) provided already exists. Please provide a new statement id, \
             or remove the existing statement."
        )));
    }
    policy.statements.push(statement);
    let size = policy.document().len();
    if size > MAX_POLICY {
        policy.statements.pop();
        return Err(ControlError::PolicyTooLong(format!(
            "The final policy size ({size}) is bigger than the limit ({MAX_POLICY})."
        )));
    }
    policy.revision_id = uuid::Uuid::new_v4().to_string();
    Ok(())
}

/// Removes a statement by id; gives the policy a new revision.
pub(super) fn remove_statement(policy: &mut PolicyRecord, sid: &str) -> Result<(), ControlError> {
    let before = policy.statements.len();
    policy.statements.retain(|s| s["Sid"] != sid);
    if policy.statements.len() == before {
        return Err(ControlError::NotFound(format!(
            "Statement {sid} is not found in resource policy."
        )));
    }
    policy.revision_id = uuid::Uuid::new_v4().to_string();
    Ok(())
}

/// How Lambda writes a `Principal`: a service, an account, an ARN or `*`.
fn principal(p: &str) -> Result<Value, ControlError> {
    if p == "*" {
        return Ok(Value::String("*".to_owned()));
    }
    if p.len() == 12 && p.bytes().all(|b| b.is_ascii_digit()) {
        return Ok(json!({"AWS": format!("arn:aws:iam::{p}:root")}));
    }
    if p.starts_with("arn:") {
        return Ok(json!({"AWS": p}));
    }
    if p.contains('.') && !p.chars().any(char::is_whitespace) {
        return Ok(json!({"Service": p}));
    }
    Err(ControlError::InvalidParameter(format!(
        "The provided principal was invalid: {p:?}. Give a service (s3.amazonaws.com), an account \
         id, an IAM ARN or *"
    )))
}

impl ControlPlane {
    /// The policy key of a reference: the qualifier, or `""` for the
    /// function itself. The qualifier must exist.
    async fn policy_key(&self, r: &FunctionRef) -> Result<String, ControlError> {
        self.resolve(r).await?;
        Ok(match r.qualifier.as_deref() {
            None => String::new(),
            Some(q) => q.to_owned(),
        })
    }

    /// `AddPermission`: returns the statement added.
    pub async fn add_permission(
        &self,
        r: &FunctionRef,
        req: AddPermissionRequest,
    ) -> Result<Value, ControlError> {
        check_statement_id(&req.statement_id)?;
        let action_ok = req.action == "*"
            || req.action == "lambda:*"
            || req
                .action
                .strip_prefix("lambda:")
                .is_some_and(|a| !a.is_empty() && a.bytes().all(|b| b.is_ascii_alphabetic()));
        if !action_ok {
            return Err(super::names::pattern_error(
                "action",
                &req.action,
                "(lambda:[*]|lambda:[a-zA-Z]+|[*])",
            ));
        }
        if let Some(a) = &req.source_account
            && (a.len() != 12 || !a.bytes().all(|b| b.is_ascii_digit()))
        {
            return Err(super::names::pattern_error("sourceAccount", a, "\\d{12}"));
        }
        if let Some(t) = &req.function_url_auth_type
            && t != "NONE"
            && t != "AWS_IAM"
        {
            return Err(ControlError::InvalidParameter(format!(
                "FunctionUrlAuthType must be NONE or AWS_IAM, not {t}"
            )));
        }
        let principal = principal(&req.principal)?;
        let _guard = self.writes.lock().await;
        let key = self.policy_key(r).await?;
        let resource = match r.qualifier.as_deref() {
            Some(q) => self.arn.qualified_arn(&r.name, q),
            None => self.arn.function_arn(&r.name),
        };
        let mut statement = json!({
            "Sid": req.statement_id,
            "Effect": "Allow",
            "Principal": principal,
            "Action": req.action,
            "Resource": resource,
        });
        let mut condition = serde_json::Map::new();
        let mut string_equals = serde_json::Map::new();
        if let Some(a) = &req.source_account {
            string_equals.insert("AWS:SourceAccount".into(), a.clone().into());
        }
        if let Some(o) = &req.principal_org_id {
            string_equals.insert("aws:PrincipalOrgID".into(), o.clone().into());
        }
        if let Some(t) = &req.event_source_token {
            string_equals.insert("lambda:EventSourceToken".into(), t.clone().into());
        }
        if let Some(t) = &req.function_url_auth_type {
            string_equals.insert("lambda:FunctionUrlAuthType".into(), t.clone().into());
        }
        if !string_equals.is_empty() {
            condition.insert("StringEquals".into(), string_equals.into());
        }
        if let Some(arn) = &req.source_arn {
            condition.insert("ArnLike".into(), json!({"AWS:SourceArn": arn}));
        }
        if !condition.is_empty() {
            statement["Condition"] = condition.into();
        }
        let (function, sid, added, expected) = (
            r.name.clone(),
            req.statement_id.clone(),
            statement.clone(),
            req.revision_id,
        );
        self.write(move |d| {
            let mut policy: PolicyRecord =
                d.get(Kind::Policy, &function, &key)?.unwrap_or_default();
            if !policy.revision_id.is_empty() {
                check_revision(&policy.revision_id, expected.as_deref())?;
            }
            add_statement(&mut policy, added, &sid)?;
            d.put(Kind::Policy, &function, &key, &policy)?;
            Ok(())
        })
        .await?;
        Ok(statement)
    }

    /// `GetPolicy`.
    pub async fn get_policy(&self, r: &FunctionRef) -> Result<PolicyRecord, ControlError> {
        let key = self.policy_key(r).await?;
        let function = r.name.clone();
        self.read(move |d| Ok(d.get::<PolicyRecord>(Kind::Policy, &function, &key)?))
            .await?
            .filter(|p| !p.statements.is_empty())
            .ok_or_else(|| {
                ControlError::NotFound("The resource you requested does not exist.".to_owned())
            })
    }

    /// `RemovePermission`.
    pub async fn remove_permission(
        &self,
        r: &FunctionRef,
        statement_id: &str,
        revision_id: Option<String>,
    ) -> Result<(), ControlError> {
        let _guard = self.writes.lock().await;
        let key = self.policy_key(r).await?;
        let (function, sid) = (r.name.clone(), statement_id.to_owned());
        self.write(move |d| {
            let mut policy: PolicyRecord =
                d.get(Kind::Policy, &function, &key)?.ok_or_else(|| {
                    ControlError::NotFound(format!(
                        "Statement {sid} is not found in resource policy."
                    ))
                })?;
            check_revision(&policy.revision_id, revision_id.as_deref())?;
            remove_statement(&mut policy, &sid)?;
            if policy.statements.is_empty() {
                d.delete(Kind::Policy, &function, &key)?;
            } else {
                d.put(Kind::Policy, &function, &key, &policy)?;
            }
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn principals_render_as_lambda_renders_them() {
        assert_eq!(principal("*").unwrap(), json!("*"));
        assert_eq!(
            principal("123456789012").unwrap(),
            json!({"AWS": "arn:aws:iam::123456789012:root"})
        );
        assert_eq!(
            principal("s3.amazonaws.com").unwrap(),
            json!({"Service": "s3.amazonaws.com"})
        );
        assert_eq!(
            principal("arn:aws:iam::123456789012:role/r").unwrap(),
            json!({"AWS": "arn:aws:iam::123456789012:role/r"})
        );
        assert!(principal("nobody").is_err());
    }

    #[test]
    fn statements_are_unique_and_bounded() {
        let mut p = PolicyRecord::default();
        add_statement(&mut p, json!({"Sid": "a"}), "a").unwrap();
        let first = p.revision_id.clone();
        assert!(matches!(
            add_statement(&mut p, json!({"Sid": "a"}), "a"),
            Err(ControlError::Conflict(_))
        ));
        let big = json!({"Sid": "b", "x": "y".repeat(MAX_POLICY)});
        assert!(matches!(
            add_statement(&mut p, big, "b"),
            Err(ControlError::PolicyTooLong(_))
        ));
        remove_statement(&mut p, "a").unwrap();
        assert_ne!(p.revision_id, first);
        assert!(matches!(
            remove_statement(&mut p, "a"),
            Err(ControlError::NotFound(_))
        ));
    }
}
