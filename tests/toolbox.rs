//! The tool-use dataset's own calls, run on the built-in toolbox
//! (`pipeline_infer::toolbox`): every call the traces ran executes here,
//! the two the traces report as failing fail here, and the pure tools print
//! exactly the `<tool_result>` the traces show.

mod common;

use pipeline_infer::toolbox::{Toolbox, py_display};

/// Tools whose results do not depend on a clock, a random draw or a mock
/// service: ours must print the trace's result.
const PURE: &[&str] = &[
    "add_days_to_date",
    "calculate_combinations",
    "calculate_date_diff",
    "calculate_tax",
    "calculator",
    "char_count",
    "compute_median",
    "compute_min_max",
    "compute_std_dev",
    "convert_bases",
    "convert_currency",
    "convert_time_zone",
    "deduplicate_list",
    "extract_hashtags",
    "extract_urls",
    "fetch_crypto_price",
    "fetch_stock_price",
    "filter_list",
    "get_unix_timestamp",
    "get_weather",
    "get_weekday_from_date",
    "reverse_list",
    "slugify_text",
    "sort_list",
    "unit_conversion",
    "validate_email",
    "word_count",
];

/// Equal text, numbers equal to 1e-12 relative (the last digit of a float
/// sum may differ with the order of additions).
fn same_result(a: &str, b: &str) -> bool {
    fn split(s: &str) -> Vec<(bool, String)> {
        let mut out: Vec<(bool, String)> = Vec::new();
        for c in s.chars() {
            let numeric = c.is_ascii_digit() || c == '.' || c == 'e';
            match out.last_mut() {
                Some((n, t)) if *n == numeric => t.push(c),
                _ => out.push((numeric, c.to_string())),
            }
        }
        out
    }
    let (x, y) = (split(a), split(b));
    x.len() == y.len()
        && x.iter().zip(&y).all(|((n1, t1), (_, t2))| {
            t1 == t2
                || (*n1
                    && match (t1.parse::<f64>(), t2.parse::<f64>()) {
                        (Ok(u), Ok(v)) => (u - v).abs() <= 1e-12 * v.abs().max(1.0),
                        _ => false,
                    })
        })
}

#[test]
fn the_datasets_calls_run_as_its_traces_ran_them() {
    let snapshot = common::shared_dir()
        .join("hf/hub/datasets--shawhin--tool-use-finetuning/snapshots/0000000000000000000000000000000000000001/data");
    assert!(snapshot.is_dir(), "../shared/hf is missing: {}", snapshot.display());
    let toolbox = Toolbox::builtin("tool-use-finetuning").unwrap();
    let (mut ran, mut failed_as_traced, mut equal) = (0, 0, 0);
    let mut problems = Vec::new();
    for split in ["train", "validation"] {
        let rows = pipeline_data::read_file(&snapshot.join(format!("{split}-00000-of-00001.parquet"))).unwrap();
        for row in rows {
            let trace = row["trace"].as_array().unwrap();
            for (i, m) in trace.iter().enumerate() {
                let text = m["content"].as_str().unwrap_or_default();
                if m["role"] != "assistant" || !text.contains("<tool_call>") {
                    continue;
                }
                let Some(result) = trace.get(i + 1).and_then(|r| r["content"].as_str()) else { continue };
                let calls = pipeline_infer::toolcall::parse(text);
                let [call] = calls.calls.as_slice() else { continue };
                let got = toolbox.execute(call);
                let args = call.arguments.to_string();
                if result.trim() == "Error: Could not get tool result." {
                    match got {
                        Err(_) => failed_as_traced += 1,
                        Ok(v) => {
                            problems.push(format!("{}({args}) failed in the trace, gave {}", call.name, py_display(&v)))
                        }
                    }
                    continue;
                }
                let Some(theirs) = result.split("<tool_result>").nth(1).and_then(|r| r.split("</tool_result>").next())
                else {
                    continue;
                };
                match got {
                    Err(e) => problems.push(format!("{}({args}) ran in the trace, fails here: {e}", call.name)),
                    Ok(v) => {
                        ran += 1;
                        if PURE.contains(&call.name.as_str()) {
                            let ours = py_display(&v);
                            if same_result(&ours, theirs.trim()) {
                                equal += 1;
                            } else {
                                problems.push(format!(
                                    "{}({args}): {ours} here, {} in the trace",
                                    call.name,
                                    theirs.trim()
                                ));
                            }
                        }
                    }
                }
            }
        }
    }
    println!(
        "the dataset's calls: {ran} ran as in their traces ({equal} pure-tool results equal), {failed_as_traced} failed as traced"
    );
    assert!(problems.is_empty(), "{} calls differ from their traces:\n{}", problems.len(), problems.join("\n"));
    assert!(
        ran > 300 && equal > 200 && failed_as_traced == 2,
        "too few calls checked: {ran} / {equal} / {failed_as_traced}"
    );
}
