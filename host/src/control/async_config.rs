//! Asynchronous invocation settings per function and qualifier: retry
//! attempts, maximum event age, and the destinations of success and
//! failure records. Stored here; the async queue reads them.

use super::model::{EventInvokeRecord, LATEST};
use super::names::FunctionRef;
use super::requests::{DestinationConfigInput, EventInvokeConfigRequest};
use super::{ControlError, ControlPlane, page_size, paginate};
use crate::store::meta::Kind;

/// How a stored config is answered.
#[derive(Debug, Clone)]
pub struct EventInvokeView {
    /// The function's name.
    pub function: String,
    /// The record.
    pub record: EventInvokeRecord,
}

fn now_seconds() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| (d.as_millis() as f64) / 1000.0)
}

/// A destination kiln can deliver to: a function, or its built-in queue.
fn check_destination(arn: &str, builtin: &str) -> Result<(), ControlError> {
    let is_function = arn.len() <= 350
        && arn.starts_with("arn:")
        && arn.split(':').nth(2) == Some("lambda")
        && arn.split(':').nth(5) == Some("function");
    if !is_function && arn != builtin {
        return Err(ControlError::InvalidParameter(format!(
            "The destination ARN {arn} is invalid: kiln delivers invocation records to a function \
             (arn:aws:lambda:...:function:NAME) or to its built-in queue ({builtin})"
        )));
    }
    Ok(())
}

fn apply(
    record: &mut EventInvokeRecord,
    req: EventInvokeConfigRequest,
    replace: bool,
    builtin: &str,
) -> Result<(), ControlError> {
    if replace {
        *record = EventInvokeRecord {
            qualifier: record.qualifier.clone(),
            ..EventInvokeRecord::default()
        };
    }
    if let Some(n) = req.maximum_retry_attempts {
        if !(0..=2).contains(&n) {
            return Err(ControlError::Validation(format!(
                "1 validation error detected: Value '{n}' at 'maximumRetryAttempts' failed to \
                 satisfy constraint: Member must have value between 0 and 2"
            )));
        }
        record.maximum_retry_attempts = Some(n as u32);
    }
    if let Some(n) = req.maximum_event_age_in_seconds {
        if !(60..=21600).contains(&n) {
            return Err(ControlError::Validation(format!(
                "1 validation error detected: Value '{n}' at 'maximumEventAgeInSeconds' failed to \
                 satisfy constraint: Member must have value between 60 and 21600"
            )));
        }
        record.maximum_event_age_in_seconds = Some(n as u32);
    }
    if let Some(DestinationConfigInput {
        on_success,
        on_failure,
    }) = req.destination_config
    {
        if let Some(d) = on_success {
            record.on_success = d.destination.filter(|s| !s.is_empty());
        }
        if let Some(d) = on_failure {
            record.on_failure = d.destination.filter(|s| !s.is_empty());
        }
    }
    for d in record.on_success.iter().chain(&record.on_failure) {
        check_destination(d, builtin)?;
    }
    record.last_modified = now_seconds();
    Ok(())
}

impl ControlPlane {
    fn event_qualifier(r: &FunctionRef) -> String {
        r.qualifier.clone().unwrap_or_else(|| LATEST.to_owned())
    }

    /// `PutFunctionEventInvokeConfig` (`replace`) and
    /// `UpdateFunctionEventInvokeConfig`.
    pub async fn put_event_invoke_config(
        &self,
        r: &FunctionRef,
        req: EventInvokeConfigRequest,
        replace: bool,
    ) -> Result<EventInvokeView, ControlError> {
        let _guard = self.writes.lock().await;
        self.resolve(r).await?;
        let qualifier = Self::event_qualifier(r);
        let name = r.name.clone();
        let builtin = self.arn.builtin_queue_arn();
        let record = self
            .write(move |d| {
                let existing: Option<EventInvokeRecord> =
                    d.get(Kind::EventInvoke, &name, &qualifier)?;
                if existing.is_none() && !replace {
                    return Err(ControlError::NotFound(format!(
                        "The function {name} doesn't have an EventInvokeConfig"
                    )));
                }
                let mut record = existing.unwrap_or(EventInvokeRecord {
                    qualifier: qualifier.clone(),
                    ..EventInvokeRecord::default()
                });
                apply(&mut record, req, replace, &builtin)?;
                d.put(Kind::EventInvoke, &name, &qualifier, &record)?;
                Ok(record)
            })
            .await?;
        self.data
            .set_event_config(&r.name, &record.qualifier, Some(record.clone()));
        Ok(EventInvokeView {
            function: r.name.clone(),
            record,
        })
    }

    /// `GetFunctionEventInvokeConfig`.
    pub async fn get_event_invoke_config(
        &self,
        r: &FunctionRef,
    ) -> Result<EventInvokeView, ControlError> {
        self.resolve(r).await?;
        let (name, qualifier) = (r.name.clone(), Self::event_qualifier(r));
        let record = self
            .read(move |d| Ok(d.get::<EventInvokeRecord>(Kind::EventInvoke, &name, &qualifier)?))
            .await?
            .ok_or_else(|| {
                ControlError::NotFound(format!(
                    "The function {} doesn't have an EventInvokeConfig",
                    self.arn.qualified_arn(&r.name, &Self::event_qualifier(r))
                ))
            })?;
        Ok(EventInvokeView {
            function: r.name.clone(),
            record,
        })
    }

    /// `DeleteFunctionEventInvokeConfig`.
    pub async fn delete_event_invoke_config(&self, r: &FunctionRef) -> Result<(), ControlError> {
        let _guard = self.writes.lock().await;
        self.resolve(r).await?;
        let (name, qualifier) = (r.name.clone(), Self::event_qualifier(r));
        let existed = self
            .write(move |d| Ok(d.delete(Kind::EventInvoke, &name, &qualifier)?))
            .await?;
        if !existed {
            return Err(ControlError::NotFound(format!(
                "The function {} doesn't have an EventInvokeConfig",
                self.arn.qualified_arn(&r.name, &Self::event_qualifier(r))
            )));
        }
        self.data
            .set_event_config(&r.name, &Self::event_qualifier(r), None);
        Ok(())
    }

    /// `ListFunctionEventInvokeConfigs`.
    pub async fn list_event_invoke_configs(
        &self,
        r: &FunctionRef,
        marker: Option<String>,
        max_items: Option<i64>,
    ) -> Result<(Vec<EventInvokeView>, Option<String>), ControlError> {
        let limit = page_size(max_items, 50, 50)?;
        self.latest(&r.name).await?;
        let name = r.name.clone();
        let all = self
            .read(move |d| {
                Ok(d.list::<EventInvokeRecord>(Kind::EventInvoke, &name, None, usize::MAX >> 1)?)
            })
            .await?;
        let (page, next) = paginate(all, marker, limit)?;
        Ok((
            page.into_iter()
                .map(|record| EventInvokeView {
                    function: r.name.clone(),
                    record,
                })
                .collect(),
            next,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::super::requests::DestinationInput;
    use super::*;

    const BUILTIN: &str = "arn:aws:sqs:us-east-1:000000000000:kiln-dlq";

    #[test]
    fn ranges_and_destinations_are_checked() {
        let mut r = EventInvokeRecord::default();
        apply(
            &mut r,
            EventInvokeConfigRequest {
                maximum_retry_attempts: Some(1),
                maximum_event_age_in_seconds: Some(60),
                destination_config: Some(DestinationConfigInput {
                    on_success: None,
                    on_failure: Some(DestinationInput {
                        destination: Some(
                            "arn:aws:lambda:us-east-1:000000000000:function:dlq".into(),
                        ),
                    }),
                }),
            },
            true,
            BUILTIN,
        )
        .unwrap();
        assert_eq!(r.maximum_retry_attempts, Some(1));
        assert!(r.on_failure.is_some());
        for bad in [
            EventInvokeConfigRequest {
                maximum_retry_attempts: Some(3),
                ..Default::default()
            },
            EventInvokeConfigRequest {
                maximum_event_age_in_seconds: Some(59),
                ..Default::default()
            },
            EventInvokeConfigRequest {
                maximum_event_age_in_seconds: Some(21601),
                ..Default::default()
            },
        ] {
            assert!(apply(&mut r.clone(), bad, false, BUILTIN).is_err());
        }
        assert!(check_destination("not-an-arn", BUILTIN).is_err());
        assert!(check_destination("arn:aws:sqs:us-east-1:000000000000:other", BUILTIN).is_err());
        check_destination(BUILTIN, BUILTIN).unwrap();
    }

    #[test]
    fn update_merges_and_put_replaces() {
        let mut r = EventInvokeRecord {
            maximum_retry_attempts: Some(0),
            ..Default::default()
        };
        apply(
            &mut r,
            EventInvokeConfigRequest {
                maximum_event_age_in_seconds: Some(100),
                ..Default::default()
            },
            false,
            BUILTIN,
        )
        .unwrap();
        assert_eq!(
            (r.maximum_retry_attempts, r.maximum_event_age_in_seconds),
            (Some(0), Some(100))
        );
        apply(
            &mut r,
            EventInvokeConfigRequest {
                maximum_event_age_in_seconds: Some(200),
                ..Default::default()
            },
            true,
            BUILTIN,
        )
        .unwrap();
        assert_eq!(
            (r.maximum_retry_attempts, r.maximum_event_age_in_seconds),
            (None, Some(200))
        );
    }
}
