//! SPEC §11: `GET /openapi.json` describes every endpoint the gateway
//! answers, and the live gateway keeps to it. The test drives each of the
//! document's operations into the answers it can reach here (success,
//! client errors, held answers, replayed responses, the admin API) and
//! checks every answer against the document: the status is listed (or the
//! operation has a `default`), required headers are there, and a JSON body
//! matches its schema (a small validator for the keywords the document
//! uses). Every operation in the document must have been exercised.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::Value;

use crate::helpers::*;

/// Request headers, as `TestApp::call` takes them.
type HeaderList<'a> = Vec<(&'a str, &'a str)>;

const ADMIN: (&str, &str) = ("Authorization", "Bearer conformance-admin");

/// The document and what the test saw of it.
struct Doc {
    doc: Value,
    exercised: BTreeSet<(String, String)>,
}

impl Doc {
    /// Checks one answer of `method template` against the document.
    fn check(&mut self, method: &str, template: &str, a: &Answer) {
        let what = format!("{method} {template} answered {} {:?}", a.status, a.json());
        let op = &self.doc["paths"][template][method.to_ascii_lowercase()];
        assert!(op.is_object(), "{method} {template} is not in the document");
        self.exercised
            .insert((method.to_ascii_lowercase(), template.to_string()));
        let responses = &op["responses"];
        let declared = &responses[a.status.to_string()];
        let response = if declared.is_null() {
            assert!(
                responses["default"].is_object(),
                "{what}: status not in the document"
            );
            return; // `default`: the stored upstream answer, anything goes
        } else {
            self.resolve(declared)
        };
        for (name, h) in response["headers"].as_object().into_iter().flatten() {
            let h = self.resolve(h);
            if h["required"] == true {
                assert!(
                    a.header(&name.to_ascii_lowercase()).is_some(),
                    "{what}: required header {name} missing"
                );
            }
        }
        let content = &response["content"];
        if method == "HEAD" || a.status == 204 {
            assert!(a.body.is_empty(), "{what}: a body");
            return;
        }
        let Some(media) = content.as_object() else {
            assert!(
                a.body.is_empty(),
                "{what}: a body the document does not describe"
            );
            return;
        };
        let ctype = a.header("content-type").unwrap_or_default();
        let (_, media) = media
            .iter()
            .find(|(m, _)| ctype.starts_with(m.as_str()))
            .unwrap_or_else(|| panic!("{what}: content type {ctype} not in the document"));
        if ctype.starts_with("application/json") {
            let body: Value = serde_json::from_slice(&a.body)
                .unwrap_or_else(|e| panic!("{what}: body is not JSON: {e}"));
            let mut errors = Vec::new();
            self.validate(&media["schema"], &body, "$", &mut errors);
            assert!(errors.is_empty(), "{what}: {errors:#?}");
        }
    }

    /// Follows a local `$ref`.
    fn resolve<'a>(&'a self, v: &'a Value) -> &'a Value {
        match v["$ref"].as_str() {
            Some(r) => {
                let pointer = r.strip_prefix('#').expect("a local $ref");
                self.resolve(self.doc.pointer(pointer).expect("the $ref resolves"))
            }
            None => v,
        }
    }

    /// JSON Schema, for the keywords the document uses.
    fn validate(&self, schema: &Value, v: &Value, at: &str, errors: &mut Vec<String>) {
        let schema = self.resolve(schema);
        let mut fail = |why: String| errors.push(format!("{at}: {why} (value {v})"));
        if let Some(one_of) = schema["oneOf"].as_array() {
            let matching = one_of
                .iter()
                .filter(|s| {
                    let mut e = Vec::new();
                    self.validate(s, v, at, &mut e);
                    e.is_empty()
                })
                .count();
            if matching != 1 {
                fail(format!("matches {matching} of oneOf"));
            }
        }
        if let Some(t) = schema.get("type") {
            let types: Vec<&str> = match t {
                Value::String(s) => vec![s.as_str()],
                Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
                _ => vec![],
            };
            let ok = types.iter().any(|t| match *t {
                "object" => v.is_object(),
                "array" => v.is_array(),
                "string" => v.is_string(),
                "integer" => v.is_i64() || v.is_u64(),
                "number" => v.is_number(),
                "boolean" => v.is_boolean(),
                "null" => v.is_null(),
                _ => false,
            });
            if !ok {
                fail(format!("not of type {t}"));
                return;
            }
        }
        if let Some(e) = schema["enum"].as_array()
            && !e.contains(v)
        {
            fail(format!("not one of {e:?}"));
        }
        if let (Some(p), Some(s)) = (schema["pattern"].as_str(), v.as_str())
            && !regex::Regex::new(p).unwrap().is_match(s)
        {
            fail(format!("does not match {p}"));
        }
        if let (Some(min), Some(n)) = (schema["minimum"].as_i64(), v.as_i64())
            && n < min
        {
            fail(format!("below {min}"));
        }
        if let (Some(max), Some(n)) = (schema["maximum"].as_i64(), v.as_i64())
            && n > max
        {
            fail(format!("above {max}"));
        }
        if let Some(items) = v.as_array() {
            if let Some(max) = schema["maxItems"].as_u64()
                && items.len() as u64 > max
            {
                fail(format!("more than {max} items"));
            }
            for (i, item) in items.iter().enumerate() {
                if schema.get("items").is_some() {
                    self.validate(&schema["items"], item, &format!("{at}[{i}]"), errors);
                }
            }
        }
        if let Some(obj) = v.as_object() {
            for r in schema["required"].as_array().into_iter().flatten() {
                let r = r.as_str().unwrap();
                if !obj.contains_key(r) {
                    errors.push(format!("{at}: required {r} missing"));
                }
            }
            let props = &schema["properties"];
            for (k, field) in obj {
                match props.get(k) {
                    Some(s) => self.validate(s, field, &format!("{at}.{k}"), errors),
                    None if schema["additionalProperties"] == false => {
                        errors.push(format!("{at}: {k} is not in the schema"))
                    }
                    None => {}
                }
            }
        }
    }
}

#[actix_web::test]
async fn the_live_gateway_answers_as_its_openapi_document_says() {
    let up = Fake::start_with(|req, _| {
        if req.uri.contains("slow") {
            Reply::ok("{\"slow\":true}").delay(SECS(4))
        } else if req.uri.contains("big") {
            Reply::ok(&"x".repeat(4096))
        } else {
            Reply::ok("{\"ok\":true}").header("content-type", b"application/json")
        }
    })
    .await;
    let app = TestApp::start(
        &up.url(),
        &[
            "--admin-token",
            "conformance-admin",
            "--max-body-size",
            "1KiB",
            "--max-response-size",
            "1KiB",
            "--max-pending-per-credential",
            "3",
            "--per-credential-concurrency",
            "1",
            "--max-wait",
            "5s",
        ],
    )
    .await;
    let got = app.call("GET", "/openapi.json", &[], b"").await;
    assert_eq!(got.status, 200);
    assert_eq!(got.json()["openapi"], "3.1.0");
    let mut doc = Doc {
        doc: got.json(),
        exercised: BTreeSet::new(),
    };
    doc.check("GET", "/openapi.json", &got);
    let head = app.call("HEAD", "/openapi.json", &[], b"").await;
    doc.check("HEAD", "/openapi.json", &head);
    for path in ["/healthz", "/metrics"] {
        for method in ["GET", "HEAD"] {
            let a = app.call(method, path, &[], b"").await;
            assert_eq!(a.status, 200, "{method} {path}");
            doc.check(method, path, &a);
        }
    }

    // Submissions: every method the document lists, and each refusal.
    let me = ("Authorization", "Bearer conformance");
    let sub = "/async_api/{rest}";
    for method in ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"] {
        // A credential each: the queue cap (3) is for the 429 below.
        let who = format!("Bearer {method}");
        let a = app
            .call(
                method,
                "/async_api/v2/x.json",
                &[("Authorization", &who)],
                b"",
            )
            .await;
        assert_eq!(a.status, 202, "{method}");
        doc.check(method, sub, &a);
    }
    let done = app
        .submit("POST", "/async_api/v2/done.json", &[me], b"{}")
        .await;
    let seen = app
        .wait_for_status(&done, Some(me.1), "done", SECS(10))
        .await;
    doc.check("GET", "/async_api/v2/requests/{id}.json", &seen);
    for (headers, body, want) in [
        (
            vec![me, ("X-Callback-Location", "not a url")],
            &b""[..],
            400,
        ),
        (
            vec![
                me,
                ("X-Callback-Method", "PUT"),
                ("X-Callback-Location", "http://127.0.0.1:9/"),
            ],
            b"",
            400,
        ),
        (vec![me, ("Authorization", "Bearer two")], b"", 400),
        (vec![me], &[b'x'; 2048][..], 413),
        (vec![me, ("Idempotency-Key", "k1")], b"first", 202),
        (vec![me, ("Idempotency-Key", "k1")], b"second", 422),
        (vec![me, ("Idempotency-Key", "a b")], b"", 400),
    ] {
        let a = app
            .call("POST", "/async_api/v2/refusals.json", &headers, body)
            .await;
        assert_eq!(a.status, want, "{headers:?}: {a:?}");
        doc.check("POST", sub, &a);
    }
    let long = "x".repeat(11 * 1024);
    let a = app
        .call("GET", "/async_api/v2/x.json", &[me, ("X-Long", &long)], b"")
        .await;
    assert_eq!(a.status, 431);
    doc.check("GET", sub, &a);
    // Respond-async: the stored response itself (`default`), or the 202.
    let prefer = ("Prefer", "respond-async, wait=3");
    let a = app
        .call("POST", "/async_api/v2/quick.json", &[me, prefer], b"")
        .await;
    assert_eq!(a.status, 200, "{a:?}");
    assert!(a.header("content-location").is_some());
    doc.check("POST", sub, &a);
    // A lane held by a slow request: 409 in flight, then the cap (429).
    let slow_as = ("Authorization", "Bearer slow");
    let slow = app
        .submit("POST", "/async_api/v2/slow.json", &[slow_as], b"")
        .await;
    app.wait_for_status(&slow, Some(slow_as.1), "started", SECS(10))
        .await;
    let queued = app
        .submit("POST", "/async_api/v2/slow2.json", &[slow_as], b"")
        .await;
    for _ in 0..2 {
        app.submit("POST", "/async_api/v2/slow2.json", &[slow_as], b"")
            .await;
    }
    let a = app
        .call("POST", "/async_api/v2/slow3.json", &[slow_as], b"")
        .await;
    assert_eq!(a.status, 429, "{a:?}");
    doc.check("POST", sub, &a);
    let a = app
        .call(
            "POST",
            "/async_api/v2/quick.json",
            &[slow_as, ("Prefer", "respond-async, wait=1")],
            b"",
        )
        .await;
    assert_eq!(a.status, 429, "{a:?}");

    // Status, cancel and held answers.
    let status = "/async_api/v2/requests/{id}.json";
    let path = |id: &str| format!("/async_api/v2/requests/{id}.json");
    let cases: Vec<(&str, String, HeaderList, u16)> = vec![
        ("GET", path(&slow), vec![slow_as], 200),
        (
            "GET",
            path(&queued),
            vec![slow_as, ("Prefer", "wait=1")],
            200,
        ),
        ("HEAD", path(&queued), vec![slow_as], 200),
        ("GET", path(&done), vec![me, ("Prefer", "wait=1")], 303),
        ("HEAD", path(&done), vec![me], 303),
        ("GET", path(&done), vec![slow_as], 404),
        ("GET", path("nope"), vec![me], 404),
        ("HEAD", path("nope"), vec![me], 404),
        ("DELETE", path(&slow), vec![slow_as], 409),
        ("DELETE", path("01JDQ8M3Z1X4A6QF0W3N9YB2KD"), vec![me], 404),
    ];
    for (method, p, headers, want) in cases {
        let a = app.call(method, &p, &headers, b"").await;
        assert_eq!(a.status, want, "{method} {p}: {a:?}");
        doc.check(method, status, &a);
    }

    // Responses: replayed (`default`), not there, too large.
    let response = "/async_api/v2/responses/{id}.json";
    let big = app
        .submit("GET", "/async_api/v2/big.json", &[me], b"")
        .await;
    app.wait_for_status(&big, Some(me.1), "done", SECS(10))
        .await;
    for (method, id, want) in [
        ("GET", &done, 200),
        ("HEAD", &done, 200),
        ("GET", &big, 502),
        ("HEAD", &big, 502),
        ("GET", &slow, 404),
        ("HEAD", &slow, 404),
    ] {
        let a = app
            .call(
                method,
                &format!("/async_api/v2/responses/{id}.json"),
                &[me],
                b"",
            )
            .await;
        // The slow one is another credential's: 404 all the same.
        assert_eq!(a.status, want, "{method} {id}: {a:?}");
        doc.check(method, response, &a);
    }

    // Bulk status.
    let bulk = "/async_api/v2/requests.json";
    let ids = format!("{{\"ids\": [\"{done}\", \"{slow}\", \"x\"]}}");
    for (headers, body, want) in [
        (vec![me], ids.as_bytes(), 200),
        (vec![me, ("Prefer", "wait=1")], ids.as_bytes(), 200),
        (vec![me], &b"{\"ids\": []}"[..], 400),
        (vec![me], b"not json", 400),
        (vec![me], &b"{\"ids\": [7]}"[..], 400),
    ] {
        let a = app
            .call("POST", "/async_api/v2/requests.json", &headers, body)
            .await;
        assert_eq!(a.status, want, "{a:?}");
        doc.check("POST", bulk, &a);
    }
    let huge = format!("{{\"ids\": [\"{}\"]}}", "x".repeat(2 << 20));
    let a = app
        .call(
            "POST",
            "/async_api/v2/requests.json",
            &[me],
            huge.as_bytes(),
        )
        .await;
    assert_eq!(a.status, 413, "{a:?}");
    doc.check("POST", bulk, &a);

    // The admin API.
    let list = "/admin/requests";
    for (query, headers, want) in [
        ("?status=done&limit=1", vec![ADMIN], 200),
        ("", vec![ADMIN], 200),
        ("?limit=abc", vec![ADMIN], 400),
        ("?limit=0", vec![ADMIN], 400),
        ("?status=lost", vec![ADMIN], 400),
        ("?after=zzz", vec![ADMIN], 400),
        ("", vec![], 401),
    ] {
        let a = app
            .call("GET", &format!("{list}{query}"), &headers, b"")
            .await;
        assert_eq!(a.status, want, "{query}: {a:?}");
        doc.check("GET", list, &a);
    }
    let requeue = "/admin/requests/{id}/requeue";
    let delete = "/admin/requests/{id}";
    for (method, template, p, headers, want) in [
        (
            "POST",
            requeue,
            format!("/admin/requests/{done}/requeue"),
            vec![ADMIN],
            409,
        ),
        (
            "POST",
            requeue,
            "/admin/requests/nope/requeue".to_string(),
            vec![ADMIN],
            404,
        ),
        (
            "POST",
            requeue,
            format!("/admin/requests/{done}/requeue"),
            vec![],
            401,
        ),
        (
            "DELETE",
            delete,
            format!("/admin/requests/{queued}"),
            vec![ADMIN],
            409,
        ),
        (
            "DELETE",
            delete,
            format!("/admin/requests/{done}"),
            vec![],
            401,
        ),
        (
            "DELETE",
            delete,
            format!("/admin/requests/{done}"),
            vec![ADMIN],
            204,
        ),
        (
            "DELETE",
            delete,
            format!("/admin/requests/{done}"),
            vec![ADMIN],
            404,
        ),
    ] {
        let a = app.call(method, &p, &headers, b"").await;
        assert_eq!(a.status, want, "{method} {p}: {a:?}");
        doc.check(method, template, &a);
    }
    // An owner deletes a finished request: 204.
    let a = app.call("DELETE", &path(&big), &[me], b"").await;
    assert_eq!(a.status, 204);
    doc.check("DELETE", status, &a);

    let mut missing = Vec::new();
    for (template, item) in doc.doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            if !doc.exercised.contains(&(method.clone(), template.clone())) {
                missing.push(format!("{method} {template}"));
            }
        }
    }
    assert!(missing.is_empty(), "not exercised: {missing:?}");
    app.stop().await;
}

/// The document's schemas are what the views render: an operator's tool
/// built from it reads every field the gateway sends.
#[actix_web::test]
async fn the_document_names_every_error_code_the_handlers_use() {
    let up = Fake::start().await;
    let app = TestApp::start(&up.url(), &[]).await;
    let text = String::from_utf8(app.call("GET", "/openapi.json", &[], b"").await.body).unwrap();
    for code in [
        "invalid_callback_location",
        "invalid_callback_method",
        "multiple_authorization",
        "invalid_idempotency_key",
        "body_too_large",
        "idempotency_key_reused",
        "idempotency_key_in_flight",
        "too_many_pending",
        "headers_too_large",
        "store_unavailable",
        "insufficient_storage",
        "in_flight",
        "response_too_large",
        "invalid_bulk_request",
        "invalid_limit",
        "invalid_status",
        "invalid_after",
    ] {
        assert!(text.contains(code), "{code} is not in the document");
    }
    actix_web::rt::time::sleep(Duration::from_millis(1)).await;
    app.stop().await;
}
