//! The 40 tools of `shawhin/tool-use-finetuning`, implemented to run the
//! calls a model makes as the dataset's own traces ran them.
//!
//! Pure tools (arithmetic, dates, lists, text) compute what their
//! description says and print what the traces' `<tool_result>` blocks show
//! (tested on every call of the dataset that has a result). Tools that would
//! reach the world answer from fixed tables, as the traces do: weather for
//! four cities, four stocks, four coins, four currencies, a clock stopped at
//! `2024-01-15T12:30:45`, searches that echo the query, messages that are
//! "sent". They fail where a real service would refuse the request: an
//! unknown city, symbol, currency, unit, table or time zone, a date that is
//! not a date, an empty list for a statistic, a post over 280 characters,
//! a filter condition that is not a Python expression on `x`. Local times
//! (Unix timestamps of a date) are US Central time, as in the traces.

use chrono::{Datelike, NaiveDate, NaiveDateTime, NaiveTime, TimeZone};
use serde_json::{Value, json};

use super::pyexpr::{self, Py};
use super::{Args, ToolImpl};

macro_rules! tools {
    ($($name:ident($($param:literal),*)),* $(,)?) => {
        /// Every tool of the dataset with its signature.
        pub const TOOLS: &[ToolImpl] = &[$(ToolImpl { name: stringify!($name), params: &[$($param),*], run: $name }),*];
    };
}

tools! {
    add_days_to_date("date", "days"),
    add_to_todo_list("task"),
    calculate_combinations("n", "r"),
    calculate_date_diff("start_date", "end_date"),
    calculate_tax("income"),
    calculator("expression"),
    char_count("text", "character"),
    compute_median("numbers"),
    compute_min_max("numbers"),
    compute_std_dev("numbers"),
    convert_bases("number", "from_base", "to_base"),
    convert_currency("amount", "from_currency", "to_currency"),
    convert_time_zone("datetime_str", "from_timezone", "to_timezone"),
    create_event("title", "datetime_str", "location"),
    deduplicate_list("items"),
    extract_hashtags("text"),
    extract_phone_number("text"),
    extract_urls("text"),
    fetch_crypto_price("symbol"),
    fetch_stock_price("symbol"),
    filter_list("items", "condition"),
    generate_password("length?", "use_symbols?", "use_numbers?", "use_uppercase?"),
    get_current_datetime(),
    get_unix_timestamp("date"),
    get_weather("city"),
    get_weekday_from_date("date"),
    notion_search("query"),
    post_to_x("message"),
    query_database("query", "dataset"),
    retrieve_data("query"),
    reverse_list("items"),
    send_email("to", "subject", "body"),
    send_slack_message("channel", "message"),
    set_reminder("message", "datetime_str"),
    slugify_text("text"),
    sort_list("items", "descending?"),
    unit_conversion("value", "from_unit", "to_unit"),
    validate_email("email"),
    web_search("query"),
    word_count("text"),
}

/// The clock of the traces.
const NOW: &str = "2024-01-15T12:30:45";

fn date(args: &Args, name: &str) -> Result<NaiveDate, String> {
    let s = args.str(name)?;
    NaiveDate::parse_from_str(s.trim(), "%Y-%m-%d").map_err(|_| format!("invalid date '{s}': expected YYYY-MM-DD"))
}

/// An ISO 8601 date and time, as `datetime.fromisoformat` reads it (a date
/// alone is midnight; an offset is accepted and kept out of the result).
fn iso_datetime(args: &Args, name: &str) -> Result<NaiveDateTime, String> {
    let s = args.str(name)?.trim();
    if let Ok(dt) = chrono::DateTime::parse_from_rfc3339(&s.replace(' ', "T")) {
        return Ok(dt.naive_local());
    }
    for fmt in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%d %H:%M"] {
        if let Ok(dt) = NaiveDateTime::parse_from_str(s, fmt) {
            return Ok(dt);
        }
    }
    NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .map(|d| d.and_time(NaiveTime::MIN))
        .map_err(|_| format!("invalid isoformat string: '{s}'"))
}

/// A stable six-digit id for a mock record (the traces' ids are random).
fn mock_id(prefix: &str, parts: &[&str]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in parts.iter().flat_map(|p| p.bytes().chain([0])) {
        h = (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
    }
    format!("{prefix}_{}", 100_000 + h % 900_000)
}

/// `urllib.parse.quote`: unreserved characters and `/` kept, the rest
/// percent-encoded as UTF-8.
fn quote(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'.' | b'-' | b'~' | b'/' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn non_empty<'a>(args: &'a Args, name: &str) -> Result<&'a str, String> {
    let s = args.str(name)?;
    if s.trim().is_empty() { Err(format!("argument '{name}' is empty")) } else { Ok(s) }
}

fn add_days_to_date(a: &Args) -> Result<Value, String> {
    let d = date(a, "date")?;
    let days = a.int("days")?;
    let out = d.checked_add_signed(chrono::Duration::days(days)).ok_or("date out of range")?;
    Ok(json!(out.format("%Y-%m-%d").to_string()))
}

fn add_to_todo_list(a: &Args) -> Result<Value, String> {
    let task = non_empty(a, "task")?;
    Ok(json!({"status": "added", "task_id": mock_id("task", &[task]), "task": task}))
}

fn calculate_combinations(a: &Args) -> Result<Value, String> {
    let (n, r) = (a.int("n")?, a.int("r")?);
    if n < 0 || r < 0 {
        return Err("n must be a non-negative integer".into());
    }
    if r > n {
        return Ok(json!(0));
    }
    let r = r.min(n - r);
    let mut c: u128 = 1;
    for i in 0..r as u128 {
        c = c.checked_mul(n as u128 - i).ok_or("result too large")? / (i + 1);
    }
    u64::try_from(c).map(|c| json!(c)).map_err(|_| "result too large".into())
}

fn calculate_date_diff(a: &Args) -> Result<Value, String> {
    Ok(json!((date(a, "end_date")? - date(a, "start_date")?).num_days()))
}

fn calculate_tax(a: &Args) -> Result<Value, String> {
    let income = a.num("income")?;
    if income < 0.0 {
        return Err("income must be non-negative".into());
    }
    // The brackets the traces were computed with (single filer).
    const BRACKETS: [(f64, f64); 7] = [
        (11_600.0, 0.10),
        (47_150.0, 0.12),
        (100_525.0, 0.22),
        (191_950.0, 0.24),
        (243_725.0, 0.32),
        (609_350.0, 0.35),
        (f64::INFINITY, 0.37),
    ];
    let (mut tax, mut lower) = (0.0, 0.0);
    for (upper, rate) in BRACKETS {
        if income > lower {
            tax += (income.min(upper) - lower) * rate;
        }
        lower = upper;
    }
    let tax = (tax * 100.0).round() / 100.0;
    let rate = if income > 0.0 { tax / income * 100.0 } else { 0.0 };
    Ok(json!({"tax_amount": tax, "effective_rate": rate}))
}

fn calculator(a: &Args) -> Result<Value, String> {
    match pyexpr::eval(a.str("expression")?, &[])? {
        v @ (Py::Int(_) | Py::Float(_)) => Ok(v.to_json()),
        other => Err(format!("the expression is not arithmetic (it gives {})", super::py_repr(&other.to_json()))),
    }
}

fn char_count(a: &Args) -> Result<Value, String> {
    let (text, ch) = (a.str("text")?, a.str("character")?);
    // str.count: non-overlapping; the empty string is found between characters.
    let n = if ch.is_empty() { text.chars().count() + 1 } else { text.matches(ch).count() };
    Ok(json!(n))
}

fn compute_median(a: &Args) -> Result<Value, String> {
    let mut v = a.numbers("numbers")?;
    if v.is_empty() {
        return Err("no median for empty data".into());
    }
    v.sort_by(|x, y| x.0.total_cmp(&y.0));
    let n = v.len();
    Ok(if n % 2 == 1 { v[n / 2].1.clone() } else { json!((v[n / 2 - 1].0 + v[n / 2].0) / 2.0) })
}

fn compute_min_max(a: &Args) -> Result<Value, String> {
    let v = a.numbers("numbers")?;
    let min = v.iter().min_by(|x, y| x.0.total_cmp(&y.0)).ok_or("min() arg is an empty sequence")?;
    let max = v.iter().max_by(|x, y| x.0.total_cmp(&y.0)).expect("not empty");
    Ok(json!({"min": min.1, "max": max.1}))
}

fn compute_std_dev(a: &Args) -> Result<Value, String> {
    let v: Vec<f64> = a.numbers("numbers")?.iter().map(|n| n.0).collect();
    if v.len() < 2 {
        return Err("variance requires at least two data points".into());
    }
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    let ss: f64 = v.iter().map(|x| (x - mean) * (x - mean)).sum();
    Ok(json!((ss / (v.len() - 1) as f64).sqrt()))
}

fn convert_bases(a: &Args) -> Result<Value, String> {
    let number = a.str("number")?.trim();
    let (from, to) = (a.int("from_base")?, a.int("to_base")?);
    if !(2..=36).contains(&from) || !(2..=36).contains(&to) {
        return Err("bases must be between 2 and 36".into());
    }
    let (neg, digits) = match number.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, number),
    };
    let mut n = u128::from_str_radix(digits, from as u32)
        .map_err(|_| format!("invalid literal for int() with base {from}: '{number}'"))?;
    if n == 0 {
        return Ok(json!("0"));
    }
    let mut out = Vec::new();
    while n > 0 {
        out.push(char::from_digit((n % to as u128) as u32, to as u32).expect("a digit").to_ascii_uppercase());
        n /= to as u128;
    }
    if neg {
        out.push('-');
    }
    Ok(json!(out.iter().rev().collect::<String>()))
}

fn convert_currency(a: &Args) -> Result<Value, String> {
    const RATES: &[(&str, &str, f64)] = &[
        ("USD", "EUR", 0.85),
        ("USD", "GBP", 0.73),
        ("USD", "JPY", 110.0),
        ("EUR", "USD", 1.18),
        ("EUR", "GBP", 0.86),
        ("EUR", "JPY", 129.53),
        ("GBP", "USD", 1.37),
        ("GBP", "EUR", 1.16),
        ("GBP", "JPY", 150.7),
        ("JPY", "USD", 0.0091),
        ("JPY", "EUR", 0.0077),
        ("JPY", "GBP", 0.0066),
    ];
    let amount = a.num("amount")?;
    let from = a.str("from_currency")?.trim().to_ascii_uppercase();
    let to = a.str("to_currency")?.trim().to_ascii_uppercase();
    let rate = if from == to && RATES.iter().any(|(f, _, _)| *f == from) {
        1.0
    } else {
        RATES
            .iter()
            .find(|(f, t, _)| *f == from && *t == to)
            .map(|r| r.2)
            .ok_or_else(|| format!("unsupported conversion {from} -> {to} (available: USD, EUR, GBP, JPY)"))?
    };
    Ok(json!({"converted_amount": amount * rate, "rate": rate}))
}

fn time_zone(a: &Args, name: &str) -> Result<chrono_tz::Tz, String> {
    let s = a.str(name)?.trim();
    s.parse::<chrono_tz::Tz>().map_err(|_| format!("unknown time zone '{s}'"))
}

fn convert_time_zone(a: &Args) -> Result<Value, String> {
    let dt = iso_datetime(a, "datetime_str")?;
    let (from, to) = (time_zone(a, "from_timezone")?, time_zone(a, "to_timezone")?);
    let local = from.from_local_datetime(&dt).earliest().ok_or_else(|| format!("{dt} does not exist in {from}"))?;
    Ok(json!(local.with_timezone(&to).format("%Y-%m-%dT%H:%M:%S%:z").to_string()))
}

fn create_event(a: &Args) -> Result<Value, String> {
    let title = non_empty(a, "title")?;
    let when = a.str("datetime_str")?;
    iso_datetime(a, "datetime_str")?;
    let location = a.str("location")?;
    Ok(json!({"status": "created", "event_id": mock_id("event", &[title, when]), "title": title,
              "datetime": when, "location": location}))
}

fn deduplicate_list(a: &Args) -> Result<Value, String> {
    let mut out: Vec<&Value> = Vec::new();
    for item in a.list("items")? {
        if !out.contains(&item) {
            out.push(item);
        }
    }
    Ok(json!(out))
}

fn find_all(pattern: &str, text: &str) -> Value {
    let re = regex::Regex::new(pattern).expect("a valid pattern");
    json!(re.find_iter(text).map(|m| m.as_str()).collect::<Vec<_>>())
}

fn extract_hashtags(a: &Args) -> Result<Value, String> {
    Ok(find_all(r"#\w+", a.str("text")?))
}

fn extract_phone_number(a: &Args) -> Result<Value, String> {
    Ok(find_all(r"(?:\+?\d{1,2}[\s.-]?)?(?:\(\d{3}\)|\d{3})[\s.-]?\d{3}[\s.-]?\d{4}\b", a.str("text")?))
}

fn extract_urls(a: &Args) -> Result<Value, String> {
    Ok(find_all(r"https?://\S+", a.str("text")?))
}

fn lookup<'t, T>(table: &'t [(&str, T)], key: &str, what: &str) -> Result<&'t T, String> {
    table.iter().find(|(k, _)| k.eq_ignore_ascii_case(key.trim())).map(|(_, v)| v).ok_or_else(|| {
        format!(
            "{what} '{key}' not available (available: {})",
            table.iter().map(|(k, _)| *k).collect::<Vec<_>>().join(", ")
        )
    })
}

fn fetch_crypto_price(a: &Args) -> Result<Value, String> {
    const COINS: &[(&str, (f64, f64, f64))] = &[
        ("BTC", (45000.0, 1200.5, 2.74)),
        ("ETH", (3200.75, -45.25, -1.39)),
        ("ADA", (1.25, 0.05, 4.17)),
        ("DOT", (7.5, -0.15, -1.96)),
    ];
    let (p, c, pct) = lookup(COINS, a.str("symbol")?, "symbol")?;
    Ok(json!({"price": p, "change_24h": c, "change_percent": pct}))
}

fn fetch_stock_price(a: &Args) -> Result<Value, String> {
    const STOCKS: &[(&str, (f64, f64, f64))] = &[
        ("AAPL", (175.5, 2.3, 1.33)),
        ("GOOGL", (2750.8, -15.2, -0.55)),
        ("MSFT", (310.45, 5.3, 1.74)),
        ("TSLA", (850.75, 25.5, 3.09)),
    ];
    let (p, c, pct) = lookup(STOCKS, a.str("symbol")?, "symbol")?;
    Ok(json!({"price": p, "change": c, "change_percent": pct}))
}

fn filter_list(a: &Args) -> Result<Value, String> {
    let condition = a.str("condition")?;
    let mut out = Vec::new();
    for item in a.list("items")? {
        let x = Py::from_json(item)?;
        if pyexpr::eval(condition, &[("x", &x)])?.truthy() {
            out.push(item.clone());
        }
    }
    Ok(json!(out))
}

fn generate_password(a: &Args) -> Result<Value, String> {
    let length = a.int_or("length", 12)?;
    if !(1..=1024).contains(&length) {
        return Err(format!("length must be between 1 and 1024, not {length}"));
    }
    let mut alphabet: Vec<char> = ('a'..='z').collect();
    if a.bool_or("use_uppercase", true)? {
        alphabet.extend('A'..='Z');
    }
    if a.bool_or("use_numbers", true)? {
        alphabet.extend('0'..='9');
    }
    if a.bool_or("use_symbols", true)? {
        alphabet.extend("!@#$%^&*()-_=+[]{};:,.<>?/|".chars());
    }
    // splitmix64 from the length: the same call gives the same password.
    let mut state = length as u64;
    let password: String = (0..length)
        .map(|_| {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            alphabet[((z ^ (z >> 31)) % alphabet.len() as u64) as usize]
        })
        .collect();
    Ok(json!(password))
}

fn get_current_datetime(_: &Args) -> Result<Value, String> {
    Ok(json!(NOW))
}

fn get_unix_timestamp(a: &Args) -> Result<Value, String> {
    let d = date(a, "date")?;
    let local = chrono_tz::America::Chicago
        .from_local_datetime(&d.and_time(NaiveTime::MIN))
        .earliest()
        .ok_or_else(|| format!("{d} has no midnight"))?;
    Ok(json!(local.timestamp()))
}

fn get_weather(a: &Args) -> Result<Value, String> {
    const CITIES: &[(&str, (i64, &str, i64))] = &[
        ("new york", (72, "Partly Cloudy", 65)),
        ("london", (55, "Rainy", 80)),
        ("tokyo", (68, "Sunny", 70)),
        ("paris", (62, "Cloudy", 75)),
    ];
    let (t, c, h) = lookup(CITIES, a.str("city")?, "city")?;
    Ok(json!({"temperature": t, "condition": c, "humidity": h}))
}

fn get_weekday_from_date(a: &Args) -> Result<Value, String> {
    const DAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];
    Ok(json!(DAYS[date(a, "date")?.weekday().num_days_from_monday() as usize]))
}

fn notion_search(a: &Args) -> Result<Value, String> {
    let q = non_empty(a, "query")?;
    Ok(json!([{"title": format!("Search Results for: {q}"), "url": format!("https://notion.so/search?q={}", quote(q)),
               "snippet": format!("General search results for '{q}' in your Notion workspace.")}]))
}

fn post_to_x(a: &Args) -> Result<Value, String> {
    let message = non_empty(a, "message")?;
    let n = message.chars().count();
    if n > 280 {
        return Err(format!("the post has {n} characters; X allows 280"));
    }
    Ok(json!({"status": "posted", "tweet_id": mock_id("tweet", &[message]), "message": message}))
}

fn query_database(a: &Args) -> Result<Value, String> {
    let query = non_empty(a, "query")?;
    let dataset = a.str("dataset")?;
    if !["customers", "sales", "inventory"].contains(&dataset.trim()) {
        return Err(format!("no table '{dataset}' (tables: customers, sales, inventory)"));
    }
    if !query.trim_start().to_ascii_uppercase().starts_with("SELECT") {
        return Err("only SELECT queries are supported".into());
    }
    Ok(json!([{"query": query, "dataset": dataset, "results": [], "row_count": 0, "columns": []}]))
}

fn retrieve_data(a: &Args) -> Result<Value, String> {
    let q = non_empty(a, "query")?;
    Ok(
        json!([{"title": format!("Knowledge base results for: {q}"), "content": "No exact match; see the policies, onboarding and technical guides.",
               "source": "Knowledge Base", "category": "general", "relevance_score": 1}]),
    )
}

fn reverse_list(a: &Args) -> Result<Value, String> {
    Ok(json!(a.list("items")?.iter().rev().collect::<Vec<_>>()))
}

fn send_email(a: &Args) -> Result<Value, String> {
    let (to, subject) = (non_empty(a, "to")?, a.str("subject")?);
    let body = a.str("body")?;
    Ok(json!({"status": "sent", "message_id": mock_id("msg", &[to, subject, body]), "to": to, "subject": subject}))
}

fn send_slack_message(a: &Args) -> Result<Value, String> {
    let channel = non_empty(a, "channel")?;
    non_empty(a, "message")?;
    Ok(json!({"status": "sent", "channel": channel, "timestamp": NOW}))
}

fn set_reminder(a: &Args) -> Result<Value, String> {
    let message = non_empty(a, "message")?;
    let when = a.str("datetime_str")?;
    iso_datetime(a, "datetime_str")?;
    Ok(
        json!({"status": "set", "reminder_id": mock_id("reminder", &[message, when]), "message": message, "datetime": when}),
    )
}

fn slugify_text(a: &Args) -> Result<Value, String> {
    let lower = a.str("text")?.to_lowercase();
    let kept: String =
        lower.chars().filter(|c| c.is_alphanumeric() || c.is_whitespace() || *c == '-' || *c == '_').collect();
    let words: Vec<&str> =
        kept.split(|c: char| c.is_whitespace() || c == '-' || c == '_').filter(|w| !w.is_empty()).collect();
    Ok(json!(words.join("-")))
}

fn sort_list(a: &Args) -> Result<Value, String> {
    let mut sorted: Vec<Py> = a.list("items")?.iter().map(Py::from_json).collect::<Result<_, _>>()?;
    let descending = a.bool_or("descending", false)?;
    // Python's sort raises on values it cannot order.
    let mut err = None;
    sorted.sort_by(|x, y| match (pyexpr::compare("<", x, y), pyexpr::compare("<", y, x)) {
        (Ok(true), _) => std::cmp::Ordering::Less,
        (Ok(false), Ok(true)) => std::cmp::Ordering::Greater,
        (Ok(false), Ok(false)) => std::cmp::Ordering::Equal,
        (Err(e), _) | (_, Err(e)) => {
            err.get_or_insert(e);
            std::cmp::Ordering::Equal
        }
    });
    if let Some(e) = err {
        return Err(e);
    }
    if descending {
        sorted.reverse();
    }
    Ok(Value::Array(sorted.iter().map(Py::to_json).collect()))
}

fn unit_conversion(a: &Args) -> Result<Value, String> {
    // Direct factors, as the traces multiply; other pairs of one dimension
    // go through its first unit (m, kg).
    const FACTORS: &[(&str, &str, f64)] = &[
        ("m", "ft", 3.28084),
        ("ft", "m", 0.3048),
        ("km", "mi", 0.621371),
        ("mi", "km", 1.60934),
        ("m", "km", 0.001),
        ("km", "m", 1000.0),
        ("m", "mi", 0.000621371),
        ("mi", "m", 1609.34),
        ("kg", "lb", 2.20462),
        ("lb", "kg", 0.453592),
    ];
    let value = a.num("value")?;
    let from = a.str("from_unit")?.trim().to_ascii_lowercase();
    let to = a.str("to_unit")?.trim().to_ascii_lowercase();
    let factor = |f: &str, t: &str| FACTORS.iter().find(|r| r.0 == f && r.1 == t).map(|r| r.2);
    let result = match (from.as_str(), to.as_str()) {
        (f, t) if f == t && ["m", "ft", "km", "mi", "kg", "lb", "c", "f"].contains(&f) => value,
        ("c", "f") => value * 9.0 / 5.0 + 32.0,
        ("f", "c") => (value - 32.0) * 5.0 / 9.0,
        (f, t) => match factor(f, t) {
            Some(k) => value * k,
            None => {
                let base = if ["kg", "lb"].contains(&f) { "kg" } else { "m" };
                match (factor(f, base), factor(base, t)) {
                    (Some(k1), Some(k2)) => value * k1 * k2,
                    _ => return Err(format!("cannot convert {from} to {to} (units: m, ft, km, mi, kg, lb, c, f)")),
                }
            }
        },
    };
    Ok(json!(result))
}

fn validate_email(a: &Args) -> Result<Value, String> {
    let re = regex::Regex::new(r"^[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}$").expect("a valid pattern");
    Ok(json!(re.is_match(a.str("email")?)))
}

fn web_search(a: &Args) -> Result<Value, String> {
    let q = non_empty(a, "query")?;
    Ok(
        json!([{"title": format!("Search results for: {q}"), "url": format!("https://search.example.com?q={}", quote(q)),
               "snippet": format!("General search results for '{q}'.")}]),
    )
}

fn word_count(a: &Args) -> Result<Value, String> {
    Ok(json!(a.str("text")?.split_whitespace().count()))
}

#[cfg(test)]
mod tests {
    use super::super::{Toolbox, py_display};
    use crate::toolcall::ToolCall;
    use serde_json::{Value, json};

    fn run(name: &str, args: Value) -> Result<String, String> {
        let tb = Toolbox::builtin("tool-use-finetuning").unwrap();
        tb.execute(&ToolCall { name: name.into(), arguments: args }).map(|v| py_display(&v))
    }

    #[test]
    fn results_as_the_traces_print_them() {
        // Calls and results copied from the dataset's traces.
        let cases = [
            ("add_days_to_date", json!({"date": "2024-02-10", "days": 45}), "2024-03-26"),
            ("calculate_combinations", json!({"n": 14, "r": 5}), "2002"),
            ("calculate_date_diff", json!({"start_date": "2022-07-15", "end_date": "2024-06-13"}), "699"),
            ("calculate_tax", json!({"income": 55000}), "{'tax_amount': 7153.0, 'effective_rate': 13.005454545454546}"),
            ("calculator", json!({"expression": "(23 * 17) / 4"}), "97.75"),
            ("char_count", json!({"text": "Rainy roads are rarely realy red", "character": "r"}), "6"),
            ("compute_median", json!({"numbers": [3, 5, 9, 1, 8, 2]}), "4.0"),
            ("compute_median", json!({"numbers": [12, 5, 9, 18, 20]}), "12"),
            ("compute_min_max", json!({"numbers": [104, 1, 88, 45, -3]}), "{'min': -3, 'max': 104}"),
            ("compute_std_dev", json!({"numbers": [13, 15, 17, 18, 22]}), "3.391164991562634"),
            ("convert_bases", json!({"number": "ZZZ", "from_base": 36, "to_base": 8}), "133077"),
            ("convert_bases", json!({"number": "11011", "from_base": 2, "to_base": 16}), "1B"),
            (
                "convert_currency",
                json!({"amount": 150, "from_currency": "GBP", "to_currency": "USD"}),
                "{'converted_amount': 205.50000000000003, 'rate': 1.37}",
            ),
            (
                "convert_time_zone",
                json!({"datetime_str": "2024-07-01T15:00:00", "from_timezone": "UTC", "to_timezone": "Asia/Tokyo"}),
                "2024-07-02T00:00:00+09:00",
            ),
            (
                "deduplicate_list",
                json!({"items": ["milk", "bread", "eggs ", "bread ", "milk"]}),
                "['milk', 'bread', 'eggs ', 'bread ']",
            ),
            (
                "extract_hashtags",
                json!({"text": "We love #pizza and #FridayNights with good friends!"}),
                "['#pizza', '#FridayNights']",
            ),
            (
                "extract_urls",
                json!({"text": "check out https://myweb.com, and also http://info.net/page and dunno if www.stillgood.org works"}),
                "['https://myweb.com,', 'http://info.net/page']",
            ),
            ("filter_list", json!({"items": [12, 7, 24, 3, 9, 18], "condition": "x % 2 != 0"}), "[7, 3, 9]"),
            ("get_unix_timestamp", json!({"date": "2001-09-11"}), "1000184400"),
            ("get_unix_timestamp", json!({"date": "1999-12-31"}), "946620000"),
            ("get_weather", json!({"city": "Tokyo"}), "{'temperature': 68, 'condition': 'Sunny', 'humidity': 70}"),
            ("get_weekday_from_date", json!({"date": "2021-10-31"}), "Sunday"),
            ("reverse_list", json!({"items": ["dog", "cat", "mouse"]}), "['mouse', 'cat', 'dog']"),
            (
                "slugify_text",
                json!({"text": "New Product Launch!!! Exciting Times@2024"}),
                "new-product-launch-exciting-times2024",
            ),
            ("slugify_text", json!({"text": "Ice Cream & Waffle Party!"}), "ice-cream-waffle-party"),
            ("sort_list", json!({"items": [34, 7, 23, 89, 1], "descending": true}), "[89, 34, 23, 7, 1]"),
            ("unit_conversion", json!({"value": 38, "from_unit": "c", "to_unit": "f"}), "100.4"),
            ("unit_conversion", json!({"value": 80, "from_unit": "kg", "to_unit": "lb"}), "176.3696"),
            ("validate_email", json!({"email": "john.doe@website,com"}), "False"),
            ("validate_email", json!({"email": "carla.smith@domain.co"}), "True"),
            ("word_count", json!({"text": "The quick brown fox jumps over the lazy dog"}), "9"),
        ];
        for (name, args, want) in cases {
            assert_eq!(run(name, args.clone()).as_deref(), Ok(want), "{name}({args})");
        }
    }

    #[test]
    fn calls_a_real_service_would_refuse_fail() {
        let failing = [
            ("get_weather", json!({"city": "Berlin"})),
            ("get_unix_timestamp", json!({"date": "2023-17-12"})),
            ("filter_list", json!({"items": [3, "a", 12], "condition": "isinstance(x, (int, float)) and x > 10"})),
            ("filter_list", json!({"items": [3, "a", 12], "condition": "x > 10"})),
            ("compute_median", json!({"numbers": "[]"})),
            ("compute_median", json!({"numbers": []})),
            ("compute_std_dev", json!({"numbers": [4]})),
            ("convert_currency", json!({"amount": 5, "from_currency": "USD", "to_currency": "CHF"})),
            (
                "convert_time_zone",
                json!({"datetime_str": "2024-06-12T15:00:00", "from_timezone": "UTC", "to_timezone": "Mars/Olympus"}),
            ),
            ("set_reminder", json!({"message": "knit", "datetime_str": "tomorrow 10:00 AM"})),
            ("fetch_stock_price", json!({"symbol": "NVDA"})),
            ("calculator", json!({"expression": "1 / 0"})),
            ("convert_bases", json!({"number": "12", "from_base": 2, "to_base": 10})),
            ("query_database", json!({"query": "DROP TABLE sales", "dataset": "sales"})),
            ("post_to_x", json!({"message": "x".repeat(281)})),
            ("convert_bases", json!({"number": "ff", "from_base": "16", "to_base": 10})),
        ];
        for (name, args) in failing {
            assert!(run(name, args.clone()).is_err(), "{name}({args}) should fail, gave {:?}", run(name, args.clone()));
        }
    }
}
