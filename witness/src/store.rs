//! etcd's keys for the fleet: desired state, host registration under
//! leases, and the witness's own keys ([`crate::Etcd`] is built on this).
//!
//! Everything goes through etcd's v3 JSON gateway (`POST /v3/kv/range`,
//! `/v3/kv/put`, `/v3/kv/txn`, `/v3/kv/deleterange`, `/v3/lease/grant`,
//! `/v3/lease/keepalive`, `/v3/lease/revoke`), one blocking HTTP request
//! with a deadline of [`REQUEST_TIMEOUT`] per member ([`WRITE_TIMEOUT`] for
//! a write, which waits for the members' disks). Keys and values
//! travel in base64 and int64s as JSON strings; fields at their zero value
//! are left out by the gateway (an empty value, lease 0, `succeeded: false`,
//! a TTL of 0).
//!
//! # Members
//!
//! A request goes first to the member that answered last, then to the
//! others in the order given: a dead or hung member costs one failed
//! attempt (at most one deadline) once, not on every request. A member
//! counts as failed when it does not answer in time, answers something
//! that is not etcd's JSON, or answers that it cannot serve the request now
//! (`etcdserver: request timed out`, `no leader`, HTTP 5xx …); the next is
//! then tried, and [`WitnessError::Unreachable`] comes back when none
//! answers. An answer about the request itself (a lease not found, a bad
//! argument: etcd's gRPC codes InvalidArgument, NotFound, AlreadyExists,
//! PermissionDenied, FailedPrecondition, OutOfRange, Unauthenticated) is
//! the cluster's verdict, the same on every member, and comes back at once
//! as [`WitnessError::Refused`].
//!
//! Reads are linearizable (etcd's default) whichever member answers; a
//! member cut off from its cluster's quorum does not answer them in time.
//!
//! # Writes whose answer was lost
//!
//! A write that timed out on one member may still have been applied (etcd
//! can commit it after the deadline), and the next member is then asked
//! again: a [`Store::create`], [`Store::swap`] or [`Store::delete_if`]
//! answered false may have been done by that very call, and a
//! [`Store::grant`] may leave a second lease behind (it expires with its
//! TTL). A caller that must know writes a value of its own and reads it
//! back, as [`crate::Etcd::claim`] does. An [`WitnessError::Unreachable`]
//! write likewise may or may not have landed.
//!
//! # Leases
//!
//! etcd raises a TTL under its minimum to that minimum: `ceil(1.5 ×
//! election timeout)` seconds, so 2 s with etcd's default timings (1000 ms
//! election timeout; 3.4 answers `grant(1)` with a TTL of 2) and 1 s for the
//! local clusters of [`crate::server::EtcdCluster`] (500 ms). An expired
//! lease's keys are deleted within about half a second of its TTL running
//! out (etcd checks every 500 ms). etcd 3.4 answers a keep-alive of an
//! expired or unknown lease with HTTP 200 and no TTL (`{"result":
//! {"header": …, "ID": "…"}}`): [`Store::keep_alive`] answers `Ok(None)`.
//! A put under such a lease is refused (`etcdserver: requested lease not
//! found`, gRPC code 5).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::{json, Value};
use tracing::debug;

use crate::{WitnessError, REQUEST_TIMEOUT, WRITE_TIMEOUT};

/// One key-value of etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    /// The key.
    pub key: String,
    /// The value.
    pub value: Vec<u8>,
    /// The store's revision when the key was created (last created, if it
    /// was deleted in between).
    pub create_revision: i64,
    /// The store's revision at the key's last write.
    pub mod_revision: i64,
    /// The lease the key is attached to; 0: none.
    pub lease: i64,
}

/// etcd's keys through its v3 JSON gateway: the client of the fleet's
/// desired state and membership.
///
/// Cheap to clone; clones share the memory of which member answered last.
#[derive(Debug, Clone)]
pub struct Store {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    endpoints: Vec<String>,
    agent: ureq::Agent,
    /// The index of the endpoint that answered last.
    last: AtomicUsize,
}

/// Requests sent to etcd by this process (every attempt on every member).
static REQUESTS: AtomicU64 = AtomicU64::new(0);

/// Requests this process has sent to etcd so far (all endpoints, all
/// clients, the [`crate::Etcd`] witness included; every attempt on every
/// member counts, failed ones too): for "etcd requests per second" figures.
pub fn requests() -> u64 {
    REQUESTS.load(Ordering::Relaxed)
}

/// The largest answer read from etcd.
const MAX_ANSWER: u64 = 64 << 20;

/// gRPC codes that are etcd's verdict on the request itself, not a member
/// that cannot serve it now: InvalidArgument, NotFound, AlreadyExists,
/// PermissionDenied, FailedPrecondition, OutOfRange, Unauthenticated.
const VERDICTS: [i64; 7] = [3, 5, 6, 7, 9, 11, 16];

/// gRPC's NotFound (etcd: `requested lease not found`).
const NOT_FOUND: i64 = 5;

/// What one member answered.
enum Attempt {
    /// etcd's JSON answer.
    Answer(Value),
    /// etcd refused the request (a code of [`VERDICTS`]).
    Verdict { code: i64, message: String },
    /// No usable answer: try the next member.
    Failed(String),
}

impl Store {
    /// A client of the etcd members at `endpoints`, each
    /// `http://HOST:PORT` (a trailing `/` is dropped).
    pub fn new(endpoints: &[String]) -> Result<Store, WitnessError> {
        if endpoints.is_empty() {
            return Err(WitnessError::BadEndpoint(String::new()));
        }
        for e in endpoints {
            let rest = e
                .strip_prefix("http://")
                .ok_or_else(|| WitnessError::BadEndpoint(e.clone()))?;
            if rest.is_empty() || rest.contains('/') && !rest.ends_with('/') {
                return Err(WitnessError::BadEndpoint(e.clone()));
            }
        }
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(REQUEST_TIMEOUT))
            .http_status_as_error(false)
            .build()
            .into();
        Ok(Store {
            shared: Arc::new(Shared {
                endpoints: endpoints
                    .iter()
                    .map(|e| e.trim_end_matches('/').to_string())
                    .collect(),
                agent,
                last: AtomicUsize::new(0),
            }),
        })
    }

    /// The members' endpoints, as given (without a trailing `/`).
    pub fn endpoints(&self) -> &[String] {
        &self.shared.endpoints
    }

    /// The key-value at `key`; `None`: no such key.
    pub fn get(&self, key: &str) -> Result<Option<Kv>, WitnessError> {
        let v = self.post("/v3/kv/range", &json!({ "key": B64.encode(key) }))?;
        header(&v)?;
        let mut kvs = kvs(&v)?;
        match kvs.pop() {
            None => Ok(None),
            Some(kv) if kvs.is_empty() && kv.key == key => Ok(Some(kv)),
            Some(kv) => Err(WitnessError::BadAnswer(format!(
                "asked for key {key}, got {} keys (the last {})",
                kvs.len() + 1,
                kv.key
            ))),
        }
    }

    /// Every key under `prefix` (range `[prefix, prefix+1)`; every key if
    /// `prefix` is empty), sorted by key, and the store's revision at the
    /// read (to watch or compare from).
    pub fn list(&self, prefix: &str) -> Result<(Vec<Kv>, i64), WitnessError> {
        let (key, end) = prefix_range(prefix.as_bytes());
        let v = self.post(
            "/v3/kv/range",
            &json!({ "key": B64.encode(key), "range_end": B64.encode(end) }),
        )?;
        let rev = header(&v)?;
        let mut kvs = kvs(&v)?;
        if let Some(kv) = kvs.iter().find(|kv| !kv.key.starts_with(prefix)) {
            return Err(WitnessError::BadAnswer(format!(
                "listing {prefix}, got key {}",
                kv.key
            )));
        }
        kvs.sort_by(|a, b| a.key.cmp(&b.key));
        Ok((kvs, rev))
    }

    /// Writes `value` only if `key` does not exist, under `lease` if given.
    /// True: written (created); false: it exists.
    pub fn create(
        &self,
        key: &str,
        value: &[u8],
        lease: Option<i64>,
    ) -> Result<bool, WitnessError> {
        let compare = json!({"key": B64.encode(key), "target": "CREATE", "result": "EQUAL", "create_revision": "0"});
        self.txn(
            compare,
            json!({ "request_put": put_request(key, value, lease) }),
        )
        .map(|(ok, _)| ok)
    }

    /// Writes `value` only if `key`'s mod_revision is still `rev`
    /// (compare-and-swap), under `lease` if given. True: written. An absent
    /// key's mod_revision is 0 to etcd: `rev` 0 creates.
    pub fn swap(
        &self,
        key: &str,
        rev: i64,
        value: &[u8],
        lease: Option<i64>,
    ) -> Result<bool, WitnessError> {
        self.txn(
            mod_is(key, rev),
            json!({ "request_put": put_request(key, value, lease) }),
        )
        .map(|(ok, _)| ok)
    }

    /// Writes `value` at `key` unconditionally, under `lease` if given.
    pub fn put(&self, key: &str, value: &[u8], lease: Option<i64>) -> Result<(), WitnessError> {
        let v = self.post("/v3/kv/put", &put_request(key, value, lease))?;
        header(&v).map(drop)
    }

    /// Deletes `key` only if its mod_revision is still `rev`. True:
    /// deleted (never for an absent key).
    pub fn delete_if(&self, key: &str, rev: i64) -> Result<bool, WitnessError> {
        let (ok, v) = self.txn(
            mod_is(key, rev),
            json!({ "request_delete_range": { "key": B64.encode(key) } }),
        )?;
        let deleted = v
            .get("responses")
            .and_then(|r| r.get(0))
            .and_then(|r| r.get("response_delete_range"))
            .and_then(|r| number(r.get("deleted")))
            .unwrap_or(0);
        Ok(ok && deleted > 0)
    }

    /// Deletes `key` (absent is fine).
    pub fn delete(&self, key: &str) -> Result<(), WitnessError> {
        let v = self.post("/v3/kv/deleterange", &json!({ "key": B64.encode(key) }))?;
        header(&v).map(drop)
    }

    /// A new lease of `ttl_secs` seconds (etcd raises it to its minimum,
    /// see the module's documentation); its ID.
    pub fn grant(&self, ttl_secs: i64) -> Result<i64, WitnessError> {
        let v = self.post(
            "/v3/lease/grant",
            &json!({ "TTL": ttl_secs.to_string(), "ID": "0" }),
        )?;
        header(&v)?;
        match number(v.get("ID")) {
            Some(id) if id != 0 => {
                debug!(id, asked = ttl_secs, ttl = ?number(v.get("TTL")), "etcd lease granted");
                Ok(id)
            }
            _ => Err(WitnessError::BadAnswer(format!(
                "a lease grant without an ID: {}",
                snippet(&v.to_string())
            ))),
        }
    }

    /// Renews `lease` to its full TTL: `Some(TTL)` in seconds, or `None`
    /// when it has expired or never existed (etcd answers no TTL, or one
    /// <= 0).
    pub fn keep_alive(&self, lease: i64) -> Result<Option<i64>, WitnessError> {
        let v = match self.post("/v3/lease/keepalive", &json!({ "ID": lease.to_string() })) {
            Ok(v) => v,
            Err(WitnessError::Refused {
                code: NOT_FOUND, ..
            }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let Some(result) = v.get("result").filter(|r| r.is_object()) else {
            return Err(WitnessError::BadAnswer(format!(
                "a keep-alive answer without a result: {}",
                snippet(&v.to_string())
            )));
        };
        header(result)?;
        let ttl = match result.get("TTL") {
            None => 0,
            t => number(t).ok_or_else(|| {
                WitnessError::BadAnswer(format!("a keep-alive's TTL {}", result["TTL"]))
            })?,
        };
        Ok((ttl > 0).then_some(ttl))
    }

    /// Ends `lease` now: its keys are deleted. An expired or unknown lease
    /// is fine (it has ended already).
    pub fn revoke(&self, lease: i64) -> Result<(), WitnessError> {
        match self.post("/v3/lease/revoke", &json!({ "ID": lease.to_string() })) {
            Ok(v) => header(&v).map(drop),
            Err(WitnessError::Refused {
                code: NOT_FOUND, ..
            }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// A transaction of one comparison and one request on success: whether
    /// it succeeded, and the answer.
    fn txn(&self, compare: Value, success: Value) -> Result<(bool, Value), WitnessError> {
        let v = self.post(
            "/v3/kv/txn",
            &json!({ "compare": [compare], "success": [success] }),
        )?;
        header(&v)?;
        let ok = match v.get("succeeded") {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                return Err(WitnessError::BadAnswer(format!(
                    "a transaction's succeeded: {other}"
                )))
            }
        };
        Ok((ok, v))
    }

    /// Posts `body` to `path`, on the member that answered last first, then
    /// on the others in order.
    pub(crate) fn post(&self, path: &str, body: &Value) -> Result<Value, WitnessError> {
        let s = &*self.shared;
        let n = s.endpoints.len();
        let first = s.last.load(Ordering::Relaxed).min(n - 1);
        let body = body.to_string();
        let mut failures = Vec::new();
        for i in std::iter::once(first).chain((0..n).filter(|&i| i != first)) {
            match self.attempt(&s.endpoints[i], path, &body) {
                Attempt::Answer(v) => {
                    s.last.store(i, Ordering::Relaxed);
                    return Ok(v);
                }
                Attempt::Verdict { code, message } => {
                    s.last.store(i, Ordering::Relaxed);
                    return Err(WitnessError::Refused { code, message });
                }
                Attempt::Failed(why) => {
                    debug!("etcd member failed: {why}");
                    failures.push(why);
                }
            }
        }
        Err(WitnessError::Unreachable(failures.join("; ")))
    }

    /// One request to one member.
    fn attempt(&self, endpoint: &str, path: &str, body: &str) -> Attempt {
        REQUESTS.fetch_add(1, Ordering::Relaxed);
        let url = format!("{endpoint}{path}");
        let mut resp = match self
            .shared
            .agent
            .post(&url)
            .config()
            .timeout_global(Some(deadline(path)))
            .build()
            .header("content-type", "application/json")
            .send(body)
        {
            Ok(r) => r,
            Err(e) => return Attempt::Failed(format!("{url}: {e}")),
        };
        let status = resp.status();
        let text = match resp
            .body_mut()
            .with_config()
            .limit(MAX_ANSWER)
            .lossy_utf8(true)
            .read_to_string()
        {
            Ok(t) => t,
            Err(e) => return Attempt::Failed(format!("{url}: HTTP {status}, reading: {e}")),
        };
        classify(&url, status.as_u16(), &text)
    }
}

/// The deadline of one request to one member: [`REQUEST_TIMEOUT`], or
/// [`WRITE_TIMEOUT`] for a request etcd commits through its log (a put, a
/// transaction, a delete, a lease's grant or revocation), which waits for
/// the members' disks: a slow disk (a sync that takes a second) would
/// otherwise fail every write, and a claim would wait for the disk to
/// recover instead of for the write. A hung member still costs one read's
/// deadline: a claim reads first, and writes to the member that answered.
fn deadline(path: &str) -> std::time::Duration {
    match path {
        "/v3/kv/put" | "/v3/kv/txn" | "/v3/kv/deleterange" | "/v3/lease/grant"
        | "/v3/lease/revoke" => WRITE_TIMEOUT,
        _ => REQUEST_TIMEOUT,
    }
}

/// What an answer of HTTP `status` with body `text` from `url` means.
fn classify(url: &str, status: u16, text: &str) -> Attempt {
    // The gateway streams a keep-alive's answers as JSON objects one after
    // the other: the first is the answer.
    let v = serde_json::Deserializer::from_str(text)
        .into_iter::<Value>()
        .next()
        .and_then(Result::ok)
        .filter(Value::is_object);
    let Some(v) = v else {
        return Attempt::Failed(format!("{url}: HTTP {status}: {}", snippet(text)));
    };
    if let Some((code, message)) = etcd_error(&v) {
        return if VERDICTS.contains(&code) {
            Attempt::Verdict {
                code,
                message: format!("{url}: {message}"),
            }
        } else {
            Attempt::Failed(format!(
                "{url}: HTTP {status}: {message} (gRPC code {code})"
            ))
        };
    }
    if (200..300).contains(&status) {
        Attempt::Answer(v)
    } else {
        Attempt::Failed(format!("{url}: HTTP {status}: {}", snippet(text)))
    }
}

/// The error in an answer of the gateway, with its gRPC code: a call's
/// (`{"error": "…", "message": "…", "code": 14}`) or a stream's
/// (`{"error": {"grpc_code": 14, "message": "…", …}}`).
fn etcd_error(v: &Value) -> Option<(i64, String)> {
    // gRPC's Unknown when there is no code.
    const UNKNOWN: i64 = 2;
    match v.get("error")? {
        Value::String(s) if s.is_empty() => None,
        Value::String(s) => Some((number(v.get("code")).unwrap_or(UNKNOWN), s.clone())),
        Value::Object(o) => Some((
            number(o.get("grpc_code")).unwrap_or(UNKNOWN),
            o.get("message")
                .and_then(Value::as_str)
                .unwrap_or("an error without a message")
                .to_string(),
        )),
        Value::Null => None,
        other => Some((UNKNOWN, other.to_string())),
    }
}

/// The store's revision in the header of an answer: every answer of etcd
/// has one.
fn header(v: &Value) -> Result<i64, WitnessError> {
    v.get("header")
        .and_then(|h| number(h.get("revision")))
        .ok_or_else(|| {
            WitnessError::BadAnswer(format!(
                "an answer without a header revision: {}",
                snippet(&v.to_string())
            ))
        })
}

/// The key-values of a range's answer (none when there is no `kvs`).
fn kvs(v: &Value) -> Result<Vec<Kv>, WitnessError> {
    match v.get("kvs") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(a)) => a.iter().map(kv).collect(),
        Some(other) => Err(WitnessError::BadAnswer(format!(
            "a range's kvs: {}",
            snippet(&other.to_string())
        ))),
    }
}

/// One key-value of the gateway's JSON.
fn kv(v: &Value) -> Result<Kv, WitnessError> {
    let raw = v.get("key").and_then(Value::as_str).unwrap_or("");
    let corrupt = |key: &str, err: String| WitnessError::Corrupt {
        key: key.to_string(),
        err,
    };
    let key = B64
        .decode(raw)
        .map_err(|e| corrupt(raw, format!("the key's base64: {e}")))
        .and_then(|k| {
            String::from_utf8(k).map_err(|_| corrupt(raw, "the key is not UTF-8".into()))
        })?;
    if key.is_empty() {
        return Err(WitnessError::BadAnswer(format!(
            "a key-value without a key: {}",
            snippet(&v.to_string())
        )));
    }
    let value = match v.get("value") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => B64
            .decode(s)
            .map_err(|e| corrupt(&key, format!("the value's base64: {e}")))?,
        Some(other) => return Err(corrupt(&key, format!("the value {other}"))),
    };
    let revision = |name: &str| {
        number(v.get(name))
            .filter(|r| *r > 0)
            .ok_or_else(|| corrupt(&key, format!("no {name}")))
    };
    let lease = match v.get("lease") {
        None | Some(Value::Null) => 0,
        l => number(l).ok_or_else(|| corrupt(&key, format!("the lease {}", v["lease"])))?,
    };
    Ok(Kv {
        create_revision: revision("create_revision")?,
        mod_revision: revision("mod_revision")?,
        lease,
        value,
        key,
    })
}

/// A put's request (`/v3/kv/put`, or a transaction's `request_put`).
fn put_request(key: &str, value: &[u8], lease: Option<i64>) -> Value {
    let mut put = json!({ "key": B64.encode(key), "value": B64.encode(value) });
    if let Some(lease) = lease {
        put["lease"] = Value::String(lease.to_string());
    }
    put
}

/// The comparison "`key`'s mod_revision is `rev`".
fn mod_is(key: &str, rev: i64) -> Value {
    json!({"key": B64.encode(key), "target": "MOD", "result": "EQUAL", "mod_revision": rev.to_string()})
}

/// The range `[key, end)` of every key starting with `prefix`: `end` is
/// `prefix` with its last byte below 0xff incremented (and the bytes after
/// it dropped); `[\0, \0)` is every key to etcd.
fn prefix_range(prefix: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return (prefix.to_vec(), end);
        }
    }
    if prefix.is_empty() {
        (vec![0], vec![0])
    } else {
        (prefix.to_vec(), vec![0])
    }
}

/// An int64 of the gateway's JSON (a string) or a plain number.
pub(crate) fn number(v: Option<&Value>) -> Option<i64> {
    match v? {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_i64(),
        _ => None,
    }
}

/// The start of `text`, for messages.
fn snippet(text: &str) -> String {
    let text = text.trim();
    match text.char_indices().nth(200) {
        Some((i, _)) => format!("{}…", &text[..i]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_numbers_are_strings_or_numbers() {
        assert_eq!(number(Some(&json!("42"))), Some(42));
        assert_eq!(number(Some(&json!(7))), Some(7));
        assert_eq!(number(Some(&json!(null))), None);
        assert_eq!(number(Some(&json!("x"))), None);
        assert_eq!(number(None), None);
    }

    #[test]
    fn prefixes_end_after_their_last_key() {
        assert_eq!(prefix_range(b"/a/"), (b"/a/".to_vec(), b"/a0".to_vec()));
        assert_eq!(prefix_range(b"a\xff"), (b"a\xff".to_vec(), b"b".to_vec()));
        assert_eq!(prefix_range(b"\xff"), (b"\xff".to_vec(), vec![0]));
        assert_eq!(prefix_range(b""), (vec![0], vec![0]));
    }

    #[test]
    fn key_values_parse_with_zero_fields_left_out() {
        let v = json!({"key": B64.encode("/k"), "create_revision": "3", "mod_revision": "5", "version": "2"});
        assert_eq!(
            kv(&v).unwrap(),
            Kv {
                key: "/k".into(),
                value: vec![],
                create_revision: 3,
                mod_revision: 5,
                lease: 0
            }
        );
        let v = json!({"key": B64.encode("/k"), "value": B64.encode("x"), "create_revision": "3", "mod_revision": "5", "lease": "77"});
        let kv1 = kv(&v).unwrap();
        assert_eq!((kv1.value, kv1.lease), (b"x".to_vec(), 77));
    }

    #[test]
    fn bad_key_values_are_errors_not_panics() {
        let bad = [
            json!({}),
            json!({"key": 5}),
            json!({"key": "!!!", "create_revision": "1", "mod_revision": "1"}),
            json!({"key": B64.encode([0xff, 0xfe]), "create_revision": "1", "mod_revision": "1"}),
            json!({"key": B64.encode("/k"), "mod_revision": "1"}),
            json!({"key": B64.encode("/k"), "create_revision": "1"}),
            json!({"key": B64.encode("/k"), "create_revision": "1", "mod_revision": "x"}),
            json!({"key": B64.encode("/k"), "value": "%%", "create_revision": "1", "mod_revision": "1"}),
            json!({"key": B64.encode("/k"), "value": 3, "create_revision": "1", "mod_revision": "1"}),
            json!({"key": B64.encode("/k"), "create_revision": "1", "mod_revision": "1", "lease": []}),
        ];
        for v in bad {
            assert!(kv(&v).is_err(), "{v}");
        }
        assert!(kvs(&json!({"kvs": "x"})).is_err());
        assert!(kvs(&json!({"kvs": [1]})).is_err());
        assert_eq!(kvs(&json!({})).unwrap(), vec![]);
        assert!(header(&json!({})).is_err());
        assert!(header(&json!({"header": {"revision": "x"}})).is_err());
        assert_eq!(header(&json!({"header": {"revision": "9"}})).unwrap(), 9);
    }

    #[test]
    fn answers_are_classified() {
        let u = "http://m";
        assert!(matches!(
            classify(u, 200, r#"{"header":{}}"#),
            Attempt::Answer(_)
        ));
        // A keep-alive's stream: the first object.
        assert!(matches!(
            classify(u, 200, "{\"result\":{}}\n{\"result\":{}}\n"),
            Attempt::Answer(_)
        ));
        // Not etcd, or not now: the next member.
        for (status, text) in [
            (200, ""),
            (200, "[1]"),
            (200, "{\"head"),
            (404, "Not Found"),
            (502, "{}"),
            (
                503,
                r#"{"error":"etcdserver: request timed out","message":"etcdserver: request timed out","code":14}"#,
            ),
            (
                500,
                r#"{"error":"context deadline exceeded","message":"context deadline exceeded","code":2}"#,
            ),
            (
                503,
                r#"{"error":{"grpc_code":14,"http_code":503,"message":"etcdserver: no leader","http_status":"Service Unavailable"}}"#,
            ),
            (200, r#"{"error":{"grpc_code":14}}"#),
            (200, r#"{"error":7}"#),
        ] {
            assert!(
                matches!(classify(u, status, text), Attempt::Failed(_)),
                "{status} {text}"
            );
        }
        // The cluster's verdict on the request.
        match classify(
            u,
            404,
            r#"{"error":"etcdserver: requested lease not found","message":"etcdserver: requested lease not found","code":5}"#,
        ) {
            Attempt::Verdict { code, message } => {
                assert_eq!(code, 5);
                assert!(message.contains("lease not found"), "{message}");
            }
            _ => panic!("not a verdict"),
        }
        assert!(matches!(
            classify(u, 200, r#"{"error":"","header":{}}"#),
            Attempt::Answer(_)
        ));
    }

    #[test]
    fn snippets_cut_on_characters() {
        let long = "é".repeat(300);
        assert_eq!(snippet(&long).chars().count(), 201);
        assert_eq!(snippet(" ab "), "ab");
    }
}
