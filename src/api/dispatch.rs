//! From a parsed [`ApiRequest`] to the VMM and back: the [`Controller`] trait the VMM
//! implements, and [`dispatch`], which calls it and turns the outcome into a response
//! (204 for a done action, 200 with JSON for a GET, `{"fault_message": ...}` for an
//! error, as Firecracker answers).

use serde::Serialize;

use super::request::{ActionType, ApiRequest, SnapshotCreate, SnapshotLoad, VmStateChange};

/// The status codes this API answers with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok,
    NoContent,
    BadRequest,
    NotFound,
    MethodNotAllowed,
    PayloadTooLarge,
    InternalServerError,
    ServiceUnavailable,
}

impl Status {
    pub fn code(self) -> u16 {
        match self {
            Status::Ok => 200,
            Status::NoContent => 204,
            Status::BadRequest => 400,
            Status::NotFound => 404,
            Status::MethodNotAllowed => 405,
            Status::PayloadTooLarge => 413,
            Status::InternalServerError => 500,
            Status::ServiceUnavailable => 503,
        }
    }
}

/// A response before it is HTTP: status, optional JSON body, and for a 405 the
/// methods the path takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiResponse {
    pub status: Status,
    pub body: Option<String>,
    pub allow: &'static [&'static str],
}

impl ApiResponse {
    pub fn no_content() -> Self {
        ApiResponse { status: Status::NoContent, body: None, allow: &[] }
    }

    /// 200 with `value` as JSON.
    pub fn json<T: Serialize>(value: &T) -> Self {
        match serde_json::to_string(value) {
            Ok(body) => ApiResponse { status: Status::Ok, body: Some(body), allow: &[] },
            Err(e) => Self::fault(Status::InternalServerError, format!("cannot encode the answer: {e}")),
        }
    }

    /// An error in Firecracker's shape: `{"fault_message": "..."}`.
    pub fn fault(status: Status, message: String) -> Self {
        let body = serde_json::json!({ "fault_message": message }).to_string();
        ApiResponse { status, body: Some(body), allow: &[] }
    }
}

/// Why the VMM did not do what was asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ControlError {
    /// The request cannot be done in this state or with these values (400): "pause
    /// first", a path that cannot be written, a snapshot this host cannot run...
    Refused(String),
    /// skiff failed doing something it should have been able to do (500).
    Internal(String),
}

/// A plain message is a refusal, so a controller can use `?` on `Result<_, String>`.
impl From<String> for ControlError {
    fn from(s: String) -> Self {
        ControlError::Refused(s)
    }
}

/// The machine's lifecycle state as `GET /` names it (Firecracker's strings).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum InstanceState {
    #[serde(rename = "Not started")]
    NotStarted,
    Running,
    Paused,
}

/// The body of `GET /`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct InstanceInfo {
    pub id: String,
    pub state: InstanceState,
    pub vmm_version: String,
    pub app_name: String,
}

impl InstanceInfo {
    /// Info for this skiff binary: version and app name filled in.
    pub fn new(id: String, state: InstanceState) -> Self {
        InstanceInfo { id, state, vmm_version: env!("CARGO_PKG_VERSION").to_string(), app_name: "skiff".to_string() }
    }
}

/// The body of `GET /machine-config` (Firecracker's field names).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MachineConfig {
    pub vcpu_count: u32,
    pub mem_size_mib: u64,
    /// skiff shows each vCPU as its own core, never as SMT siblings.
    pub smt: bool,
    pub track_dirty_pages: bool,
}

/// What the VMM does for the API, one method per action. Called on the event loop's
/// thread; a method returns when the action is done (a pause when every vCPU has left
/// KVM_RUN), so the response reports the outcome, not a request in flight.
pub trait Controller {
    fn pause(&mut self) -> Result<(), ControlError>;
    fn resume(&mut self) -> Result<(), ControlError>;
    fn create_snapshot(&mut self, params: &SnapshotCreate) -> Result<(), ControlError>;
    fn load_snapshot(&mut self, params: &SnapshotLoad) -> Result<(), ControlError>;
    fn info(&mut self) -> Result<InstanceInfo, ControlError>;
    fn machine_config(&mut self) -> Result<MachineConfig, ControlError>;
    /// What `--stats` prints, as a JSON value of the VMM's choosing.
    fn stats(&mut self) -> Result<serde_json::Value, ControlError>;
    fn ctrl_alt_del(&mut self) -> Result<(), ControlError>;
}

/// Does `request` through `ctl` and says how it went.
pub fn dispatch(request: &ApiRequest, ctl: &mut dyn Controller) -> ApiResponse {
    let done = |r: Result<(), ControlError>| r.map(|()| ApiResponse::no_content());
    let outcome = match request {
        ApiRequest::Vm(VmStateChange::Paused) => done(ctl.pause()),
        ApiRequest::Vm(VmStateChange::Resumed) => done(ctl.resume()),
        ApiRequest::SnapshotCreate(p) => done(ctl.create_snapshot(p)),
        ApiRequest::SnapshotLoad(p) => done(ctl.load_snapshot(p)),
        ApiRequest::Action(ActionType::SendCtrlAltDel) => done(ctl.ctrl_alt_del()),
        ApiRequest::Action(ActionType::FlushMetrics) => Ok(ApiResponse::no_content()),
        ApiRequest::Info => ctl.info().map(|i| ApiResponse::json(&i)),
        ApiRequest::MachineConfig => ctl.machine_config().map(|m| ApiResponse::json(&m)),
        ApiRequest::Stats => ctl.stats().map(|s| ApiResponse::json(&s)),
    };
    match outcome {
        Ok(r) => r,
        Err(ControlError::Refused(m)) => ApiResponse::fault(Status::BadRequest, m),
        Err(ControlError::Internal(m)) => ApiResponse::fault(Status::InternalServerError, m),
    }
}

#[cfg(test)]
pub(crate) mod mock {
    use super::*;

    /// A controller that records what it was asked and fails where told to.
    #[derive(Default)]
    pub struct MockController {
        pub calls: Vec<String>,
        pub paused: bool,
        /// The next action fails with this.
        pub fail_next: Option<ControlError>,
    }

    impl MockController {
        fn act(&mut self, what: String) -> Result<(), ControlError> {
            self.calls.push(what);
            match self.fail_next.take() {
                Some(e) => Err(e),
                None => Ok(()),
            }
        }
    }

    impl Controller for MockController {
        fn pause(&mut self) -> Result<(), ControlError> {
            self.act("pause".into())?;
            self.paused = true;
            Ok(())
        }
        fn resume(&mut self) -> Result<(), ControlError> {
            self.act("resume".into())?;
            self.paused = false;
            Ok(())
        }
        fn create_snapshot(&mut self, p: &SnapshotCreate) -> Result<(), ControlError> {
            if !self.paused {
                self.calls.push("create refused".into());
                return Err("pause the VM first (PATCH /vm {\"state\": \"Paused\"})".to_string().into());
            }
            self.act(format!("create {} {} {:?}", p.snapshot_path.display(), p.mem_file_path.display(), p.snapshot_type))
        }
        fn load_snapshot(&mut self, p: &SnapshotLoad) -> Result<(), ControlError> {
            self.act(format!("load {} {} resume={}", p.snapshot_path.display(), p.mem_file_path.display(), p.resume_vm))
        }
        fn info(&mut self) -> Result<InstanceInfo, ControlError> {
            self.calls.push("info".into());
            let state = if self.paused { InstanceState::Paused } else { InstanceState::Running };
            Ok(InstanceInfo::new("vm0".into(), state))
        }
        fn machine_config(&mut self) -> Result<MachineConfig, ControlError> {
            self.calls.push("machine-config".into());
            Ok(MachineConfig { vcpu_count: 2, mem_size_mib: 256, smt: false, track_dirty_pages: false })
        }
        fn stats(&mut self) -> Result<serde_json::Value, ControlError> {
            self.calls.push("stats".into());
            Ok(serde_json::json!({ "exits": { "io": 12 } }))
        }
        fn ctrl_alt_del(&mut self) -> Result<(), ControlError> {
            self.act("ctrl-alt-del".into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::mock::MockController;
    use super::*;
    use crate::api::request::parse;

    fn run(ctl: &mut MockController, method: &str, path: &str, body: &str) -> (u16, Option<String>) {
        let r = match parse(method, path, body.as_bytes()) {
            Ok(req) => dispatch(&req, ctl),
            Err(r) => r,
        };
        (r.status.code(), r.body)
    }

    #[test]
    fn actions_answer_204_and_gets_200_with_json() {
        let mut c = MockController::default();
        let info = r#"{"id":"vm0","state":"Running","vmm_version":"0.1.0","app_name":"skiff"}"#;
        assert_eq!(run(&mut c, "GET", "/", ""), (200, Some(info.into())));
        assert_eq!(run(&mut c, "PATCH", "/vm", r#"{"state":"Paused"}"#), (204, None));
        assert_eq!(run(&mut c, "GET", "/", "").1.unwrap(), info.replace("Running", "Paused"));
        let create = r#"{"snapshot_path":"/s","mem_file_path":"/m","snapshot_type":"Diff"}"#;
        assert_eq!(run(&mut c, "PUT", "/snapshot/create", create), (204, None));
        let load = r#"{"snapshot_path":"/s","mem_backend":{"backend_path":"/m","backend_type":"File"},"resume_vm":true}"#;
        assert_eq!(run(&mut c, "PUT", "/snapshot/load", load), (204, None));
        assert_eq!(run(&mut c, "PATCH", "/vm", r#"{"state":"Resumed"}"#), (204, None));
        assert_eq!(run(&mut c, "PUT", "/actions", r#"{"action_type":"SendCtrlAltDel"}"#), (204, None));
        assert_eq!(run(&mut c, "PUT", "/actions", r#"{"action_type":"FlushMetrics"}"#), (204, None));
        let mc = r#"{"vcpu_count":2,"mem_size_mib":256,"smt":false,"track_dirty_pages":false}"#;
        assert_eq!(run(&mut c, "GET", "/machine-config", ""), (200, Some(mc.into())));
        assert_eq!(run(&mut c, "GET", "/stats", ""), (200, Some(r#"{"exits":{"io":12}}"#.into())));
        assert_eq!(
            c.calls,
            ["info", "pause", "info", "create /s /m Diff", "load /s /m resume=true", "resume", "ctrl-alt-del", "machine-config", "stats"]
        );
    }

    #[test]
    fn controller_errors_become_400_or_500_with_a_fault_message() {
        let mut c = MockController::default();
        let create = r#"{"snapshot_path":"/s","mem_file_path":"/m"}"#;
        assert_eq!(
            run(&mut c, "PUT", "/snapshot/create", create),
            (400, Some(r#"{"fault_message":"pause the VM first (PATCH /vm {\"state\": \"Paused\"})"}"#.into()))
        );
        c.fail_next = Some(ControlError::Internal("KVM_GET_REGS failed".into()));
        assert_eq!(run(&mut c, "PATCH", "/vm", r#"{"state":"Paused"}"#), (500, Some(r#"{"fault_message":"KVM_GET_REGS failed"}"#.into())));
        assert!(!c.paused);
        // A request refused before dispatch never reaches the controller.
        let before = c.calls.len();
        assert_eq!(run(&mut c, "PATCH", "/vm", r#"{"state":"Paused","x":1}"#).0, 400);
        assert_eq!(c.calls.len(), before);
    }
}
