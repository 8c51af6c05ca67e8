//! User-facing recipe errors.
//!
//! Everything a user can fix by editing the recipe or the command line is a
//! [`RecipeError`]: it names the file, the line and column when known, and the
//! key, and says what to do. The binary maps it to exit code 2; every other
//! failure (I/O, bad data rows, a template that raises while rendering) is a
//! runtime error with context, exit code 1.

use std::fmt;
use std::path::PathBuf;

/// Where in a recipe something is: file plus 1-based line and column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file.display(), self.line, self.column)
    }
}

impl Location {
    /// Converts a byte offset into `source` to a line/column location.
    pub fn from_offset(file: impl Into<PathBuf>, source: &str, offset: usize) -> Self {
        let offset = offset.min(source.len());
        let before = &source[..offset];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        Location { file: file.into(), line, column }
    }
}

/// A mistake in a recipe or in command-line overrides.
#[derive(Debug, thiserror::Error)]
pub struct RecipeError {
    /// Where the mistake is, when it can be pinned to a place in the file.
    pub location: Option<Location>,
    /// The file, when no line is known.
    pub file: Option<PathBuf>,
    /// Dotted key path (`stages.train.rank`), when known.
    pub key: Option<String>,
    pub message: String,
    /// What the user should do, e.g. a "did you mean" suggestion.
    pub help: Option<String>,
}

impl RecipeError {
    pub fn new(message: impl Into<String>) -> Self {
        RecipeError { location: None, file: None, key: None, message: message.into(), help: None }
    }
    pub fn at(mut self, location: Option<Location>) -> Self {
        self.location = location;
        self
    }
    pub fn in_file(mut self, file: impl Into<PathBuf>) -> Self {
        self.file = Some(file.into());
        self
    }
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }
    pub fn help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }
}

impl fmt::Display for RecipeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.location, &self.file) {
            (Some(loc), _) => write!(f, "{loc}: ")?,
            (None, Some(file)) => write!(f, "{}: ", file.display())?,
            _ => {}
        }
        if let Some(key) = &self.key {
            write!(f, "key `{key}`: ")?;
        }
        write!(f, "{}", self.message)?;
        if let Some(help) = &self.help {
            write!(f, "\n  help: {help}")?;
        }
        Ok(())
    }
}

/// The closest candidate to `word` by edit distance, if it is close enough to
/// be a plausible typo.
pub fn did_you_mean<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (strsim::damerau_levenshtein(word, c), c))
        .filter(|(d, c)| *d <= (c.len().max(word.len()) / 3).max(2))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}
