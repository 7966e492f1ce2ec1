//! The access filter: which patients and devices a request may see, computed once per
//! request from its principal. Every handler and stream asks this one filter; none decides
//! visibility on its own.
//!
//! Admins see everything. Clinicians and viewers see the patients assigned to them and the
//! devices monitoring those patients, nothing else (not even devices attached to nobody). A
//! device token sees its own device. Out-of-scope resources answer 404, like missing ones, so
//! a caller cannot learn which patients exist.

use std::collections::HashSet;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use chrono::Utc;
use telemon_model::AlertEvent;
use telemon_store::AuditEntry;

use crate::auth::{Credential, Principal, Role};
use crate::error::HttpError;
use crate::AppState;

#[derive(Clone, Debug, PartialEq)]
pub enum Scope {
    All,
    Only {
        patients: HashSet<String>,
        devices: HashSet<String>,
    },
}

impl Scope {
    pub fn device(&self, device: &str) -> bool {
        match self {
            Scope::All => true,
            Scope::Only { devices, .. } => devices.contains(device),
        }
    }

    pub fn patient(&self, patient: &str) -> bool {
        match self {
            Scope::All => true,
            Scope::Only { patients, .. } => patients.contains(patient),
        }
    }

    /// An alert's subject is a patient, or a device attached to no patient.
    pub fn alert(&self, alert: &AlertEvent) -> bool {
        self.patient(&alert.subject) || self.device(&alert.subject)
    }
}

/// A request's principal with its scope: the extractor every data handler takes.
#[derive(Clone, Debug)]
pub struct Access {
    pub principal: Principal,
    pub scope: Scope,
}

impl Access {
    pub fn new(principal: Principal, scope: Scope) -> Self {
        Access { principal, scope }
    }

    /// Fails with 404 unless the device is in scope.
    pub fn device(&self, device: &str) -> Result<(), HttpError> {
        self.scope
            .device(device)
            .then_some(())
            .ok_or(HttpError::NotFound("device"))
    }

    pub fn patient(&self, patient: &str) -> Result<(), HttpError> {
        self.scope
            .patient(patient)
            .then_some(())
            .ok_or(HttpError::NotFound("patient"))
    }

    /// Acknowledging takes a clinician or an admin; viewers and device tokens only look.
    pub fn may_acknowledge(&self) -> Result<(), HttpError> {
        match (self.principal.role, &self.principal.credential) {
            (_, Credential::Device { .. }) | (Role::Viewer, _) => Err(HttpError::Forbidden),
            _ => Ok(()),
        }
    }

    /// Writes a view of patient data to the audit log. A view that cannot be audited is not
    /// served: the caller propagates the error.
    pub async fn audit(
        &self,
        state: &AppState,
        action: &str,
        target: &str,
    ) -> Result<(), HttpError> {
        let entry = AuditEntry {
            at: Utc::now(),
            actor: self.principal.name.clone(),
            action: action.to_string(),
            target: target.to_string(),
        };
        state.store.record_audit(&entry).await?;
        Ok(())
    }
}

/// The scope of a principal as the assignment tables say it now.
pub async fn scope_of(state: &AppState, principal: &Principal) -> Result<Scope, HttpError> {
    if let Credential::Device { device } = &principal.credential {
        return Ok(Scope::Only {
            patients: HashSet::new(),
            devices: HashSet::from([device.clone()]),
        });
    }
    if principal.role == Role::Admin {
        return Ok(Scope::All);
    }

    let assigned = state.store.assigned_patients(&principal.name).await?;
    let mut patients = HashSet::new();
    let mut devices = HashSet::new();
    for (patient, patient_devices) in assigned {
        patients.insert(patient);
        devices.extend(patient_devices);
    }
    Ok(Scope::Only { patients, devices })
}

impl FromRequestParts<AppState> for Access {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, HttpError> {
        let principal = Principal::from_request_parts(parts, state).await?;
        let scope = scope_of(state, &principal).await?;
        Ok(Access { principal, scope })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use telemon_model::{AlertState, Priority};

    fn principal(role: Role, credential: Credential) -> Principal {
        Principal {
            name: "ann".into(),
            role,
            credential,
        }
    }

    fn alert(subject: &str) -> AlertEvent {
        AlertEvent {
            id: "a1".into(),
            rule: "r".into(),
            subject: subject.into(),
            priority: Priority::High,
            state: AlertState::Firing,
            metric: None,
            value: None,
            message: String::new(),
            started_at: Utc::now(),
            updated_at: Utc::now(),
            acknowledged_by: None,
            acknowledged_at: None,
        }
    }

    #[test]
    fn a_limited_scope_sees_only_its_patients_and_their_devices() {
        let scope = Scope::Only {
            patients: HashSet::from(["p1".to_string()]),
            devices: HashSet::from(["bed-1".to_string()]),
        };
        assert!(scope.patient("p1") && !scope.patient("p2"));
        assert!(scope.device("bed-1") && !scope.device("bed-2"));
        assert!(scope.alert(&alert("p1")) && scope.alert(&alert("bed-1")));
        assert!(!scope.alert(&alert("p2")) && !scope.alert(&alert("room-3")));
        assert!(Scope::All.alert(&alert("anything")));
    }

    #[test]
    fn only_clinicians_and_admins_acknowledge() {
        let access = |role, credential| Access::new(principal(role, credential), Scope::All);
        assert!(access(Role::Clinician, Credential::ApiToken)
            .may_acknowledge()
            .is_ok());
        assert!(access(Role::Admin, Credential::Bootstrap)
            .may_acknowledge()
            .is_ok());
        assert!(access(Role::Viewer, Credential::ApiToken)
            .may_acknowledge()
            .is_err());
        let device = Credential::Device {
            device: "bed-1".into(),
        };
        assert!(access(Role::Viewer, device).may_acknowledge().is_err());
    }

    #[test]
    fn out_of_scope_looks_like_missing() {
        let access = Access::new(
            principal(Role::Clinician, Credential::ApiToken),
            Scope::Only {
                patients: HashSet::new(),
                devices: HashSet::new(),
            },
        );
        assert!(matches!(
            access.device("bed-9"),
            Err(HttpError::NotFound("device"))
        ));
        assert!(matches!(
            access.patient("p9"),
            Err(HttpError::NotFound("patient"))
        ));
    }
}
