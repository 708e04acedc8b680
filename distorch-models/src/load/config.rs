//! Reading `config.json` files with errors that name the file and the field.

use std::path::Path;

use serde::de::DeserializeOwned;

use crate::error::Error;

/// Reads `path` as a `T`; a wrongly typed field is named in the error.
pub(crate) fn read<T: DeserializeOwned>(path: &Path) -> Result<T, Error> {
    let text = std::fs::read_to_string(path).map_err(|e| bad(path, e.to_string()))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(path, format!("not JSON: {e}")))?;
    from_value(path, value)
}

/// Reads `path` as a `T` and checks it with `check`.
pub(crate) fn read_checked<T: DeserializeOwned>(
    path: &Path,
    check: impl FnOnce(&T) -> Result<(), Error>,
) -> Result<T, Error> {
    let config: T = read(path)?;
    check(&config)?;
    Ok(config)
}

/// Converts an already parsed value (a nested config, say).
pub(crate) fn from_value<T: DeserializeOwned>(
    path: &Path,
    value: serde_json::Value,
) -> Result<T, Error> {
    serde_json::from_value(value.clone()).map_err(|e| {
        // Name the field: the first one that fails on its own (every field has a default).
        let field = value.as_object().and_then(|o| {
            o.iter().find(|(k, v)| {
                let one = serde_json::json!({ k.as_str(): v });
                serde_json::from_value::<T>(one).is_err()
            })
        });
        match field {
            Some((k, _)) => bad(path, format!("field `{k}`: {e}")),
            None => bad(path, e.to_string()),
        }
    })
}

fn bad(path: &Path, reason: String) -> Error {
    Error::Config {
        path: path.to_path_buf(),
        reason,
    }
}
