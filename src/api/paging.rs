//! `PageV2` paging shared by every browse call: page sizes, opaque cursors, and the one extra
//! row that tells whether another page exists (no count query).

use base64::Engine;

use super::error::ApiError;

const DEFAULT_PAGE: u32 = 50;
const MAX_PAGE: u32 = 250;

/// Where a page starts and how long it is, from a request's `itemsPerPage` and `next`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct PageRequest {
    pub items_per_page: u32,
    /// Only rows with an id below this one (the cursor's last id).
    pub before_id: Option<i64>,
}

impl PageRequest {
    pub fn parse(items_per_page: Option<u32>, next: Option<&str>) -> Result<Self, ApiError> {
        Ok(PageRequest {
            items_per_page: items_per_page.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE),
            before_id: next.map(decode_cursor).transpose()?,
        })
    }

    /// How many rows to fetch: one more than the page holds.
    pub fn fetch_limit(self) -> u32 {
        self.items_per_page + 1
    }

    /// Drops the extra row fetched, if any, and returns the cursor of the next page.
    pub fn finish<T>(self, rows: &mut Vec<T>, id: impl Fn(&T) -> &str) -> Option<String> {
        let page = self.items_per_page as usize;
        let more = rows.len() > page;
        rows.truncate(page);
        more.then(|| rows.last().map(|row| encode_cursor(id(row))))
            .flatten()
    }
}

/// Page cursors are opaque to clients: the last id seen, versioned and encoded.
fn encode_cursor(id: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("v1:{id}"))
}

fn decode_cursor(cursor: &str) -> Result<i64, ApiError> {
    let bad = || ApiError::BadRequest("invalid next token".into());
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(cursor)
        .map_err(|_| bad())?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    text.strip_prefix("v1:")
        .and_then(|id| id.parse().ok())
        .ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        assert_eq!(decode_cursor(&encode_cursor("42")).unwrap(), 42);
        for bad in ["", "!!", "djE6", "eDo0Mg"] {
            assert!(decode_cursor(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_extra_row_becomes_the_next_cursor() {
        let page = PageRequest::parse(Some(2), None).unwrap();
        assert_eq!(page.fetch_limit(), 3);
        let mut rows = vec!["9", "8", "7"];
        let next = page.finish(&mut rows, |r| r).unwrap();
        assert_eq!(rows, ["9", "8"]);
        assert_eq!(
            PageRequest::parse(None, Some(&next)).unwrap().before_id,
            Some(8)
        );
        let mut last = vec!["1"];
        assert_eq!(page.finish(&mut last, |r| r), None);
        assert_eq!(PageRequest::parse(Some(0), None).unwrap().items_per_page, 1);
        assert_eq!(
            PageRequest::parse(Some(9999), None).unwrap().items_per_page,
            250
        );
    }
}
