//! The real Gemma 3 and Qwen3 chat templates, rendered by pipeline's
//! minijinja setup, equal the reference renderings in tests/fixtures/golden/
//! (made by tests/fixtures/render_reference.py with Jinja2 configured as
//! transformers configures it, and checked by hand).

mod common;

use pipeline::stages::format_chat::parse_messages;
use pipeline_infer::chat::{ChatTemplate, Message};

fn template(models: &std::path::Path, dir: &str) -> ChatTemplate {
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(models.join(dir).join("tokenizer_config.json")).unwrap()).unwrap();
    let tok = |k: &str| match &cfg[k] {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Object(o) => o["content"].as_str().unwrap().to_string(),
        _ => String::new(),
    };
    ChatTemplate::new(cfg["chat_template"].as_str().unwrap(), &tok("bos_token"), &tok("eos_token")).unwrap()
}

fn golden(name: &str) -> String {
    std::fs::read_to_string(format!("{}/tests/fixtures/golden/{name}.txt", env!("CARGO_MANIFEST_DIR")))
        .unwrap_or_else(|e| panic!("golden {name}: {e}"))
}

#[test]
fn real_templates_render_like_transformers() {
    let Some(models) = common::models_dir() else {
        return;
    };
    let fixtures: serde_json::Value = serde_json::from_str(include_str!("fixtures/conversations.json")).unwrap();
    let mut checked = 0;
    for (model, dir) in [("gemma3", "gemma-3-270m"), ("qwen3", "qwen3-tokenizer")] {
        let t = template(&models, dir);
        for (name, conv) in fixtures.as_object().unwrap() {
            if model == "gemma3" && name == "openai_tools" {
                continue;
            }
            let msgs: Vec<Message> = parse_messages(&conv["messages"]).unwrap();
            let tools = conv.get("tools");
            assert_eq!(t.render(&msgs, tools, false).unwrap(), golden(&format!("{model}-{name}")), "{model} {name}");
            assert_eq!(
                t.render(&msgs[..msgs.len() - 1], tools, true).unwrap(),
                golden(&format!("{model}-{name}-prompt")),
                "{model} {name} with generation prompt"
            );
            checked += 2;
        }
    }
    assert_eq!(checked, 10);
}

#[test]
fn spans_are_the_assistant_turns_with_their_end_marker() {
    let Some(models) = common::models_dir() else {
        return;
    };
    let fixtures: serde_json::Value = serde_json::from_str(include_str!("fixtures/conversations.json")).unwrap();
    let msgs = parse_messages(&fixtures["tool_use_trace"]["messages"]).unwrap();

    let gemma = template(&models, "gemma-3-270m");
    assert_eq!(gemma.end_of_turn, "<end_of_turn>");
    let (text, spans) = gemma.render_with_spans(&msgs, None).unwrap();
    let got: Vec<&str> = spans.iter().map(|s| &text[s.start..s.end]).collect();
    assert_eq!(
        got,
        vec![
            "<tool_call>\n{\"tool_name\": \"get_weather\", \"args\": {\"city\": \"Paris\"}}\n</tool_call><end_of_turn>",
            "<final_answer>\nIt is 18 °C in Paris.\n</final_answer><end_of_turn>",
        ]
    );

    // Qwen3 puts an empty think block into the last turn only: the span
    // starts after the assistant header and so includes it.
    let qwen = template(&models, "qwen3-tokenizer");
    let tools_conv = &fixtures["openai_tools"];
    let msgs = parse_messages(&tools_conv["messages"]).unwrap();
    let (text, spans) = qwen.render_with_spans(&msgs, tools_conv.get("tools")).unwrap();
    let got: Vec<&str> = spans.iter().map(|s| &text[s.start..s.end]).collect();
    assert_eq!(
        got,
        vec![
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"location\": \"北京\"}}\n</tool_call><|im_end|>",
            "<think>\n\n</think>\n\nIt is 21 degrees in 北京.<|im_end|>",
        ]
    );
}

#[test]
fn a_template_that_raises_names_the_reason() {
    let Some(models) = common::models_dir() else {
        return;
    };
    let gemma = template(&models, "gemma-3-270m");
    let msgs = vec![Message::new("user", "a"), Message::new("user", "b"), Message::new("assistant", "c")];
    let err = gemma.render_with_spans(&msgs, None).unwrap_err().to_string();
    assert!(err.contains("Conversation roles must alternate"), "{err}");
}
