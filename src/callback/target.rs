//! Where one callback attempt goes: the callback URL, with a `GET`'s
//! parameters joined to its own query, and what of it must stay out of the
//! logs.

use url::{Position, Url};

use crate::model::CallbackMethod;

/// Where one attempt goes. The `url` crate reads the callback URL; the
/// fragment is dropped, since a fragment is never sent to a server (left
/// in, a GET's parameters would land after it and never arrive); the URL's
/// own query is kept byte for byte (the `url` crate would re-encode some
/// bytes, such as `'`), and a GET's parameters join it after a `&`.
pub(super) struct Target {
    pub(super) url: String,
    /// For logs: the host, never the query (SPEC §9).
    pub(super) host: String,
    /// The raw query and fragment, cut out of any error text we log.
    secrets: Vec<String>,
}

impl Target {
    pub(super) fn new(
        raw: &str,
        method: CallbackMethod,
        form: &str,
    ) -> Result<Target, url::ParseError> {
        let parsed = Url::parse(raw)?;
        // The first `#` ends the URL proper and the first `?` before it
        // starts the query, for the `url` crate and `http::Uri` alike: a
        // host or user name cannot hold either unencoded.
        let (before_fragment, fragment) = match raw.split_once('#') {
            Some((b, f)) => (b, Some(f)),
            None => (raw, None),
        };
        let own_query = before_fragment.split_once('?').map(|(_, q)| q);
        let mut url = parsed[..Position::AfterPath].to_string();
        match (own_query, method) {
            (Some(q), CallbackMethod::Get) if !q.is_empty() => {
                url.extend(["?", q, "&", form]);
            }
            (_, CallbackMethod::Get) => url.extend(["?", form]),
            (Some(q), CallbackMethod::Post) => url.extend(["?", q]),
            (None, CallbackMethod::Post) => {}
        }
        Ok(Target {
            url,
            host: parsed.host_str().unwrap_or_default().to_string(),
            secrets: own_query
                .into_iter()
                .chain(fragment)
                .chain(parsed.query())
                .chain(parsed.fragment())
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect(),
        })
    }

    /// The query string of the URL called, without the `?` (empty when it
    /// has none): what a `GET`'s signature covers (SPEC §10). The path the
    /// `url` crate wrote holds no `?` (it encodes one), so the first `?`
    /// starts the query.
    pub(super) fn query(&self) -> &str {
        self.url.split_once('?').map_or("", |(_, q)| q)
    }

    /// `text` without the URL's query or fragment. No error type promises
    /// to leave the URL out of its message, and the query may carry the
    /// receiver's secrets.
    pub(super) fn scrub(&self, text: &str) -> String {
        self.secrets
            .iter()
            .fold(text.to_string(), |t, s| t.replace(s.as_str(), "[redacted]"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FORM: &str = "response_id=X&response_http_code=200";

    fn url(raw: &str, method: CallbackMethod) -> String {
        Target::new(raw, method, FORM).unwrap().url
    }

    #[test]
    fn get_parameters_join_the_own_query_before_any_fragment() {
        use CallbackMethod::Get;
        assert_eq!(url("http://h/cb", Get), format!("http://h/cb?{FORM}"));
        assert_eq!(
            url("http://h/cb?own=1#frag", Get),
            format!("http://h/cb?own=1&{FORM}")
        );
        assert_eq!(
            url("http://h/cb#frag?x=1", Get),
            format!("http://h/cb?{FORM}"),
            "a `?` inside the fragment is the fragment's"
        );
        assert_eq!(url("http://h/cb?", Get), format!("http://h/cb?{FORM}"));
        assert_eq!(url("http://h:8080", Get), format!("http://h:8080/?{FORM}"));
    }

    #[test]
    fn the_own_query_is_kept_byte_for_byte() {
        let raw = "https://h/cb?a='x'&b=%2F+%20&c=&d&&";
        let own = "a='x'&b=%2F+%20&c=&d&&";
        assert_eq!(
            url(raw, CallbackMethod::Get),
            format!("https://h/cb?{own}&{FORM}")
        );
        assert_eq!(
            url(raw, CallbackMethod::Post),
            format!("https://h/cb?{own}")
        );
    }

    #[test]
    fn post_urls_lose_only_their_fragment() {
        use CallbackMethod::Post;
        assert_eq!(url("http://h/cb?own=1#frag", Post), "http://h/cb?own=1");
        assert_eq!(url("http://h/cb#frag", Post), "http://h/cb");
        assert_eq!(url("http://h/cb?", Post), "http://h/cb?");
    }

    #[test]
    fn the_query_called_is_the_own_query_and_the_parameters() {
        use CallbackMethod::{Get, Post};
        let q = |raw: &str, m| Target::new(raw, m, FORM).unwrap().query().to_string();
        assert_eq!(q("http://h/cb", Get), FORM);
        assert_eq!(
            q("http://h/cb?a='x'&b=%2F#f", Get),
            format!("a='x'&b=%2F&{FORM}")
        );
        assert_eq!(q("http://h/cb?", Get), FORM);
        assert_eq!(
            q("http://h/a%3Fb/cb", Get),
            FORM,
            "an encoded `?` stays in the path"
        );
        assert_eq!(q("http://h/cb?own=1", Post), "own=1");
        assert_eq!(q("http://h/cb", Post), "");
    }

    #[test]
    fn urls_the_url_crate_refuses_are_errors() {
        assert!(Target::new("http://h:99999/cb", CallbackMethod::Post, FORM).is_err());
    }

    #[test]
    fn error_text_loses_the_query_and_fragment() {
        let t = Target::new(
            "http://h.example/cb?token=s3cret#frag-s3cret",
            CallbackMethod::Get,
            FORM,
        )
        .unwrap();
        assert_eq!(t.host, "h.example");
        let text = t.scrub("could not send to http://h.example/cb?token=s3cret#frag-s3cret");
        assert!(!text.contains("s3cret"), "{text}");
        assert!(text.contains("h.example"), "{text}");
    }
}
