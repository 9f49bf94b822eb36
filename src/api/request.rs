//! What a client may ask, parsed from method, path and JSON body into [`ApiRequest`].
//!
//! Paths and field names are Firecracker's, so scripts written for it work here.
//! Bodies are strict (`deny_unknown_fields`): a misspelled field is refused with a
//! 400 that names it, rather than silently ignored.

use std::path::PathBuf;

use serde::Deserialize;

use super::dispatch::{ApiResponse, Status};

/// One request the VMM must act on (the HTTP layer already answered anything else).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApiRequest {
    /// `PATCH /vm` {"state": "Paused" | "Resumed"}
    Vm(VmStateChange),
    /// `PUT /snapshot/create`
    SnapshotCreate(SnapshotCreate),
    /// `PUT /snapshot/load`
    SnapshotLoad(SnapshotLoad),
    /// `GET /`
    Info,
    /// `PUT /actions`
    Action(ActionType),
    /// `GET /machine-config`
    MachineConfig,
    /// `GET /stats` (skiff's own)
    Stats,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum VmStateChange {
    Paused,
    Resumed,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub enum SnapshotType {
    #[default]
    Full,
    Diff,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreate {
    pub snapshot_path: PathBuf,
    pub mem_file_path: PathBuf,
    #[serde(default)]
    pub snapshot_type: SnapshotType,
}

/// `PUT /snapshot/load`, with the memory file resolved from whichever of
/// `mem_backend` or the older `mem_file_path` the client sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotLoad {
    pub snapshot_path: PathBuf,
    pub mem_file_path: PathBuf,
    pub resume_vm: bool,
    /// Firecracker's `track_dirty_pages` (or the older `enable_diff_snapshots`):
    /// keep the dirty log on so that a diff snapshot can follow.
    pub track_dirty_pages: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotLoadBody {
    snapshot_path: PathBuf,
    mem_backend: Option<MemBackend>,
    mem_file_path: Option<PathBuf>,
    #[serde(default)]
    resume_vm: bool,
    enable_diff_snapshots: Option<bool>,
    track_dirty_pages: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MemBackend {
    backend_path: PathBuf,
    backend_type: BackendType,
}

/// Firecracker's two backends; skiff maps memory files itself and has no
/// userfaultfd handler protocol, so `Uffd` is named and refused.
#[derive(Deserialize)]
enum BackendType {
    File,
    Uffd,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum ActionType {
    SendCtrlAltDel,
    /// Firecracker's metrics flush; skiff has no metrics file, so a no-op.
    FlushMetrics,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VmBody {
    state: VmStateChange,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionBody {
    action_type: ActionType,
}

/// Every path and the methods it takes (an unknown path is a 404, a known path with
/// another method a 405 naming these).
pub const ROUTES: &[(&str, &[&str])] = &[
    ("/", &["GET"]),
    ("/vm", &["PATCH"]),
    ("/snapshot/create", &["PUT"]),
    ("/snapshot/load", &["PUT"]),
    ("/actions", &["PUT"]),
    ("/machine-config", &["GET"]),
    ("/stats", &["GET"]),
];

/// Parses one request. `Err` is the response to send back as it is (4xx).
pub fn parse(method: &str, path: &str, body: &[u8]) -> Result<ApiRequest, ApiResponse> {
    let Some((route, methods)) = ROUTES.iter().copied().find(|(p, _)| *p == path) else {
        return Err(ApiResponse::fault(Status::NotFound, format!("no such resource: {}", printable(path))));
    };
    if !methods.contains(&method) {
        let mut r = ApiResponse::fault(Status::MethodNotAllowed, format!("{route} takes {}, not {method}", methods.join(", ")));
        r.allow = methods;
        return Err(r);
    }
    if method == "GET" {
        if !body.is_empty() {
            return Err(bad(format!("GET {route} takes no body")));
        }
        return Ok(match route {
            "/" => ApiRequest::Info,
            "/machine-config" => ApiRequest::MachineConfig,
            _ => ApiRequest::Stats,
        });
    }
    if body.is_empty() {
        return Err(bad(format!("{method} {route} needs a JSON body")));
    }
    match route {
        "/vm" => json::<VmBody>(body).map(|b| ApiRequest::Vm(b.state)),
        "/snapshot/create" => {
            let c: SnapshotCreate = json(body)?;
            non_empty("snapshot_path", &c.snapshot_path)?;
            non_empty("mem_file_path", &c.mem_file_path)?;
            Ok(ApiRequest::SnapshotCreate(c))
        }
        "/snapshot/load" => snapshot_load(json(body)?).map(ApiRequest::SnapshotLoad),
        _ => json::<ActionBody>(body).map(|b| ApiRequest::Action(b.action_type)),
    }
}

fn snapshot_load(b: SnapshotLoadBody) -> Result<SnapshotLoad, ApiResponse> {
    non_empty("snapshot_path", &b.snapshot_path)?;
    let mem_file_path = match (b.mem_backend, b.mem_file_path) {
        (Some(_), Some(_)) => return Err(bad("give either mem_backend or mem_file_path, not both".into())),
        (None, None) => return Err(bad("missing field `mem_backend` (or the older `mem_file_path`)".into())),
        (None, Some(p)) => p,
        (Some(MemBackend { backend_type: BackendType::Uffd, .. }), None) => {
            return Err(bad("mem_backend.backend_type Uffd is not supported by skiff (only File)".into()));
        }
        (Some(MemBackend { backend_path, backend_type: BackendType::File }), None) => backend_path,
    };
    non_empty("mem_file_path", &mem_file_path)?;
    if b.enable_diff_snapshots.is_some() && b.track_dirty_pages.is_some() {
        return Err(bad("give either track_dirty_pages or enable_diff_snapshots, not both".into()));
    }
    Ok(SnapshotLoad {
        snapshot_path: b.snapshot_path,
        mem_file_path,
        resume_vm: b.resume_vm,
        track_dirty_pages: b.track_dirty_pages.or(b.enable_diff_snapshots).unwrap_or(false),
    })
}

fn json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiResponse> {
    // serde's message names the unknown field, the wrong type or where the JSON broke.
    serde_json::from_slice(body).map_err(|e| {
        // Where an enum goes, serde_json calls any wrong type a syntax error
        // ("expected value"); read as plain JSON first, the body says what it holds.
        let typed = match serde_json::from_slice::<serde_json::Value>(body) {
            Ok(v) if e.is_syntax() => serde_json::from_value::<T>(v).err(),
            _ => None,
        };
        match typed {
            Some(t) => bad(format!("bad JSON body: {t} at line {} column {}", e.line(), e.column())),
            None => bad(format!("bad JSON body: {e}")),
        }
    })
}

fn non_empty(field: &str, p: &std::path::Path) -> Result<(), ApiResponse> {
    if p.as_os_str().is_empty() { Err(bad(format!("{field} is empty"))) } else { Ok(()) }
}

fn bad(message: String) -> ApiResponse {
    ApiResponse::fault(Status::BadRequest, message)
}

/// A client's path, cut short and without control characters, for a message.
fn printable(s: &str) -> String {
    s.chars().take(128).map(|c| if c.is_control() { '?' } else { c }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(method: &str, path: &str, body: &str) -> (Status, String) {
        let r = parse(method, path, body.as_bytes()).unwrap_err();
        let v: serde_json::Value = serde_json::from_str(r.body.as_deref().unwrap()).unwrap();
        (r.status, v["fault_message"].as_str().unwrap().to_string())
    }

    #[test]
    fn every_route_parses() {
        assert_eq!(parse("GET", "/", b""), Ok(ApiRequest::Info));
        assert_eq!(parse("GET", "/machine-config", b""), Ok(ApiRequest::MachineConfig));
        assert_eq!(parse("GET", "/stats", b""), Ok(ApiRequest::Stats));
        assert_eq!(parse("PATCH", "/vm", br#"{"state":"Paused"}"#), Ok(ApiRequest::Vm(VmStateChange::Paused)));
        assert_eq!(parse("PATCH", "/vm", br#"{"state":"Resumed"}"#), Ok(ApiRequest::Vm(VmStateChange::Resumed)));
        assert_eq!(
            parse("PUT", "/snapshot/create", br#"{"snapshot_path":"/s","mem_file_path":"/m"}"#),
            Ok(ApiRequest::SnapshotCreate(SnapshotCreate { snapshot_path: "/s".into(), mem_file_path: "/m".into(), snapshot_type: SnapshotType::Full }))
        );
        assert_eq!(
            parse("PUT", "/snapshot/create", br#"{"snapshot_path":"/s","mem_file_path":"/m","snapshot_type":"Diff"}"#),
            Ok(ApiRequest::SnapshotCreate(SnapshotCreate { snapshot_path: "/s".into(), mem_file_path: "/m".into(), snapshot_type: SnapshotType::Diff }))
        );
        let load = SnapshotLoad { snapshot_path: "/s".into(), mem_file_path: "/m".into(), resume_vm: true, track_dirty_pages: false };
        assert_eq!(
            parse("PUT", "/snapshot/load", br#"{"snapshot_path":"/s","mem_backend":{"backend_path":"/m","backend_type":"File"},"resume_vm":true}"#),
            Ok(ApiRequest::SnapshotLoad(load.clone()))
        );
        assert_eq!(
            parse("PUT", "/snapshot/load", br#"{"snapshot_path":"/s","mem_file_path":"/m","resume_vm":true}"#),
            Ok(ApiRequest::SnapshotLoad(load.clone()))
        );
        assert_eq!(
            parse("PUT", "/snapshot/load", br#"{"snapshot_path":"/s","mem_file_path":"/m","enable_diff_snapshots":true}"#),
            Ok(ApiRequest::SnapshotLoad(SnapshotLoad { resume_vm: false, track_dirty_pages: true, ..load }))
        );
        assert_eq!(parse("PUT", "/actions", br#"{"action_type":"SendCtrlAltDel"}"#), Ok(ApiRequest::Action(ActionType::SendCtrlAltDel)));
        assert_eq!(parse("PUT", "/actions", br#"{"action_type":"FlushMetrics"}"#), Ok(ApiRequest::Action(ActionType::FlushMetrics)));
    }

    #[test]
    fn refusals_say_what_is_wrong() {
        let (s, m) = err("PATCH", "/vm", r#"{"state":"Paused","extra":1}"#);
        assert_eq!(s, Status::BadRequest);
        assert!(m.contains("unknown field `extra`"), "{m}");
        let (s, m) = err("PATCH", "/vm", r#"{"state":"Frozen"}"#);
        assert_eq!(s, Status::BadRequest);
        assert!(m.contains("unknown variant `Frozen`"), "{m}");
        let (_, m) = err("PATCH", "/vm", r#"{"state":1}"#);
        assert_eq!(m, "bad JSON body: invalid type: integer `1`, expected string or map at line 1 column 10");
        let (_, m) = err("PUT", "/snapshot/create", r#"{"snapshot_path":5,"mem_file_path":"/m"}"#);
        assert_eq!(m, "bad JSON body: invalid type: integer `5`, expected path string at line 1 column 18");
        let (_, m) = err("PATCH", "/vm", r#"{"state":"#);
        assert!(m.starts_with("bad JSON body: "), "{m}");
        let (_, m) = err("PATCH", "/vm", "");
        assert_eq!(m, "PATCH /vm needs a JSON body");
        let (_, m) = err("PUT", "/snapshot/create", r#"{"snapshot_path":"/s"}"#);
        assert!(m.contains("missing field `mem_file_path`"), "{m}");
        let (_, m) = err("PUT", "/snapshot/create", r#"{"snapshot_path":"","mem_file_path":"/m"}"#);
        assert_eq!(m, "snapshot_path is empty");
        let (_, m) = err("PUT", "/snapshot/load", r#"{"snapshot_path":"/s"}"#);
        assert!(m.contains("missing field `mem_backend`"), "{m}");
        let (_, m) = err("PUT", "/snapshot/load", r#"{"snapshot_path":"/s","mem_file_path":"/m","mem_backend":{"backend_path":"/m","backend_type":"File"}}"#);
        assert!(m.contains("not both"), "{m}");
        let (_, m) = err("PUT", "/snapshot/load", r#"{"snapshot_path":"/s","mem_backend":{"backend_path":"/m","backend_type":"Uffd"}}"#);
        assert!(m.contains("Uffd is not supported"), "{m}");
        let (_, m) = err("PUT", "/snapshot/load", r#"{"snapshot_path":"/s","mem_backend":{"backend_path":"/m","backend_type":"File","x":0}}"#);
        assert!(m.contains("unknown field `x`"), "{m}");
        let (s, m) = err("PUT", "/actions", r#"{"action_type":"InstanceStart"}"#);
        assert_eq!(s, Status::BadRequest);
        assert!(m.contains("unknown variant `InstanceStart`"), "{m}");
        let (_, m) = err("GET", "/", "{}");
        assert_eq!(m, "GET / takes no body");
    }

    #[test]
    fn unknown_paths_are_404_and_wrong_methods_405() {
        assert_eq!(err("GET", "/nope", "").0, Status::NotFound);
        assert_eq!(err("GET", "/vm/", "").0, Status::NotFound);
        let (s, m) = err("\x01", "/\x07x", "");
        assert_eq!((s, m.as_str()), (Status::NotFound, "no such resource: /?x"));
        let r = parse("GET", "/vm", b"").unwrap_err();
        assert_eq!(r.status, Status::MethodNotAllowed);
        assert_eq!(r.allow, &["PATCH"]);
        assert_eq!(parse("DELETE", "/", b"").unwrap_err().status, Status::MethodNotAllowed);
        assert_eq!(parse("PUT", "/machine-config", b"{}").unwrap_err().status, Status::MethodNotAllowed);
    }
}
