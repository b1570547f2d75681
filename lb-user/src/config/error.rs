//! Configuration errors, each located in its file.

use toml::Spanned;

/// A configuration error: `FILE:LINE: message`, the key named in the message.
#[derive(Debug, thiserror::Error)]
#[error("{file}:{line}: {message}")]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub message: String,
}

/// Why a file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{0}: cannot read: {1}")]
    Read(String, std::io::Error),
    #[error(transparent)]
    Invalid(#[from] ConfigError),
}

/// Turns byte offsets of the text into `FILE:LINE` errors.
pub struct Locator<'a> {
    pub file: &'a str,
    pub text: &'a str,
}

impl Locator<'_> {
    fn line(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text[..end].bytes().filter(|&b| b == b'\n').count() + 1
    }

    /// An error at byte `offset` (0: the file as a whole).
    pub fn err(&self, offset: usize, message: impl Into<String>) -> ConfigError {
        ConfigError { file: self.file.to_owned(), line: self.line(offset), message: message.into() }
    }

    /// An error at the value `at`.
    pub fn at<T>(&self, at: &Spanned<T>, message: impl Into<String>) -> ConfigError {
        self.err(at.span().start, message)
    }

    /// A TOML syntax or type error, with the dotted key it concerns
    /// (`timeouts.connect`; array indices left out).
    pub fn toml(&self, e: serde_path_to_error::Error<toml::de::Error>) -> ConfigError {
        let key: Vec<String> = e
            .path()
            .iter()
            .filter_map(|seg| match seg {
                serde_path_to_error::Segment::Map { key } if !key.starts_with("$__") => Some(key.clone()),
                serde_path_to_error::Segment::Map { .. } | serde_path_to_error::Segment::Seq { .. } => None,
                other => Some(other.to_string()),
            })
            .collect();
        let key = key.join(".");
        let inner = e.into_inner();
        let offset = inner.span().map(|s| s.start).unwrap_or(0);
        let mut msg = inner.message().trim_end().to_owned();
        if msg.starts_with("data did not match any variant of untagged enum ServerEntry") {
            msg = "servers: each entry must be \"ip:port\" or { addr = \"ip:port\", weight = W, maxconn = N }".into();
        }
        if !key.is_empty() && !msg.contains(&key) {
            msg.push_str(&format!(" (key {key})"));
        }
        self.err(offset, msg)
    }
}
