//! Ollama Modelfiles: the trained chat template as Ollama's Go template,
//! stop strings and sampling parameters.
//!
//! A family whose template takes tools renders `.Tools`, `.ToolCalls` and
//! `tool` messages as its Jinja template does: Ollama accepts a request's
//! `tools` only for a template that uses `.Tools`, and reads a call's
//! opening tag from the first text inside `{{ if .ToolCalls }}`.

/// The chat-template families there is a Go template for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Gemma,
    /// Gemma turns with tools (the built-in `gemma-tools` template).
    GemmaTools,
    ChatMl,
    /// ChatML with Qwen's tool block (Qwen3's and Qwen2.5's own templates).
    QwenTools,
    /// Llama 3.x's own template (3.1–3.3): header-delimited turns, tools in
    /// the first user turn, a call as a bare JSON object.
    Llama3Tools,
    Alpaca,
}

/// A call's arguments (after the opening `{`) as Python's `json.dumps`
/// writes them (`"key": value` joined by `, `), in sorted key order: strings
/// with `%q` (JSON for printable text, where Go's `json` escapes `<`, `>`
/// and `&`), lists element by element, other values as Go's JSON. Shared by
/// the Go templates whose Jinja writes `arguments | tojson`.
macro_rules! python_json_arguments {
    () => {
        concat!(
            "{{- $sep := \"\" }}{{ range $k, $v := .Function.Arguments }}{{ $sep }}{{ printf \"%q\" $k }}: ",
            "{{- if eq (printf \"%T\" $v) \"string\" }} {{ printf \"%q\" $v }}",
            "{{- else if eq (printf \"%T\" $v) \"[]interface {}\" }} [",
            "{{- range $e, $x := $v }}{{ if $e }}, {{ end }}",
            "{{- if eq (printf \"%T\" $x) \"string\" }}{{ printf \"%q\" $x }}{{ else }}{{ json $x }}{{ end }}{{ end }}]",
            "{{- else }} {{ json $v }}{{ end }}",
            "{{- $sep = \", \" }}{{ end }}",
        )
    };
}

/// `gemma-tools` as a Go template, written to render byte for byte what the
/// Jinja template renders from the same request (BOS aside, which Ollama's
/// tokenizer adds): tools and arguments in sorted order (Go ranges over maps
/// in key order), strings quoted with `%q` (which equals JSON for printable
/// text, where Go's `json` would escape `<`, `>` and `&`).
const GEMMA_TOOLS: &str = concat!(
    "{{- $tools := .Tools }}{{ $system := .System }}{{ $first := true }}\n",
    "{{- range $i, $m := .Messages }}\n",
    "{{- if eq .Role \"user\" }}<start_of_turn>user\n",
    "{{ if $first }}{{ $first = false }}{{ if $system }}{{ $system }}\n\n",
    "{{ end }}{{ if $tools }}You can call these tools:\n",
    "{{ range $tools }}- {{ .Function.Name }}: {{ .Function.Description }}\n",
    "{{ $req := .Function.Parameters.Required }}",
    "{{- range $name, $p := .Function.Parameters.Properties }}  - {{ $name }} (",
    "{{- if $p.Type }}{{ $p.Type }}{{ else }}any{{ end }}",
    "{{- range $req }}{{ if eq . $name }}, required{{ end }}{{ end }}): {{ $p.Description }}",
    "{{- if $p.Enum }} One of: {{ range $j, $e := $p.Enum }}{{ if $j }}, {{ end }}{{ $e }}{{ end }}{{ end }}\n",
    "{{ end }}{{ end }}To call a tool, answer with <tool_call>\n",
    "{\"name\":\"<tool>\",\"arguments\":{<arguments>}}\n",
    "</tool_call>\n\n",
    "{{ end }}{{ end }}{{ .Content }}<end_of_turn>\n",
    "{{ else if eq .Role \"assistant\" }}<start_of_turn>model\n",
    "{{ .Content }}{{ if and $m.Content $m.ToolCalls }}\n",
    "{{ end }}{{ if .ToolCalls }}{{ range .ToolCalls }}<tool_call>\n",
    "{\"name\":{{ printf \"%q\" .Function.Name }},\"arguments\":{{ \"{\" }}",
    "{{- $sep := \"\" }}{{ range $k, $v := .Function.Arguments }}{{ $sep }}{{ printf \"%q\" $k }}:",
    "{{- if eq (printf \"%T\" $v) \"string\" }}{{ printf \"%q\" $v }}{{ else }}{{ json $v }}{{ end }}",
    "{{- $sep = \",\" }}{{ end }}}}\n",
    "</tool_call>{{ end }}{{ end }}<end_of_turn>\n",
    "{{ else if eq .Role \"tool\" }}<start_of_turn>user\n",
    "<tool_response>\n",
    "{{ .Content }}\n",
    "</tool_response><end_of_turn>\n",
    "{{ end }}\n",
    "{{- end }}<start_of_turn>model\n"
);

/// Qwen3's own template as a Go template, for requests Ollama serves: the
/// tool list in the system turn (each tool written field by field in the
/// key order of OpenAI tools, as `tojson` writes format-chat's tools:
/// properties sorted, each with its type and description), calls with
/// their arguments in sorted order, consecutive `tool` results in one user
/// turn. What it cannot write as Qwen's `tojson` does: a property's other
/// schema keys (`enum`, `items`), object arguments and lists within lists
/// (which Go's `json` writes without spaces), and whole floats (`2.0`, which
/// Go writes `2`).
const QWEN_TOOLS: &str = concat!(
    "{{- $tools := .Tools }}{{ $system := .System }}{{ $prev := \"\" }}\n",
    "{{- if $tools }}<|im_start|>system\n",
    "{{ if $system }}{{ $system }}\n\n",
    "{{ end }}# Tools\n\nYou may call one or more functions to assist with the user query.\n\n",
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>",
    "{{- range $tools }}\n",
    "{\"type\": \"function\", \"function\": {\"name\": {{ printf \"%q\" .Function.Name }}, ",
    "\"description\": {{ printf \"%q\" .Function.Description }}, \"parameters\": {\"type\": \"object\", ",
    "\"properties\": {{ \"{\" }}",
    "{{- $sep := \"\" }}{{ range $k, $p := .Function.Parameters.Properties }}{{ $sep }}{{ printf \"%q\" $k }}: ",
    "{\"type\": {{ printf \"%q\" (print $p.Type) }}, \"description\": {{ printf \"%q\" $p.Description }}}",
    "{{- $sep = \", \" }}{{ end }}}, \"required\": [",
    "{{- range $j, $r := .Function.Parameters.Required }}{{ if $j }}, {{ end }}{{ printf \"%q\" $r }}{{ end }}]}}}",
    "{{- end }}\n</tools>\n\n",
    "For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n",
    "<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n",
    "{{ else if $system }}<|im_start|>system\n{{ $system }}<|im_end|>\n",
    "{{ end }}",
    "{{- range $i, $m := .Messages }}\n",
    "{{- if eq .Role \"user\" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n",
    "{{ else if and (eq .Role \"system\") $i }}<|im_start|>system\n{{ .Content }}<|im_end|>\n",
    "{{ else if eq .Role \"assistant\" }}<|im_start|>assistant\n",
    "{{ .Content }}{{ if and $m.Content $m.ToolCalls }}\n",
    "{{ end }}{{ if .ToolCalls }}{{ range $j, $c := .ToolCalls }}<tool_call>\n",
    "{\"name\": \"{{ .Function.Name }}\", \"arguments\": {{ \"{\" }}",
    python_json_arguments!(),
    "}}\n</tool_call>",
    "{{- if gt (len (slice $m.ToolCalls $j)) 1 }}\n{{ end }}{{ end }}{{ end }}<|im_end|>\n",
    "{{ else if eq .Role \"tool\" }}{{ if ne $prev \"tool\" }}<|im_start|>user{{ end }}\n",
    "<tool_response>\n{{ .Content }}\n</tool_response>",
    "{{- if or (eq (len (slice $.Messages $i)) 1) (ne (index (slice $.Messages $i) 1).Role \"tool\") }}<|im_end|>\n{{ end }}",
    "{{ end }}{{ $prev = .Role }}\n",
    "{{- end }}<|im_start|>assistant\n"
);

/// Llama 3.2's own template as a Go template (Ollama adds the BOS): the
/// system turn with its knowledge and fixed dates
/// ([`pipeline_infer::chat::DATE_STRING`]), the tools in the first user
/// turn as `tojson(indent=4)` writes format-chat's tools (field by field:
/// properties sorted, each with its type and description), a call as
/// `{"name": …, "parameters": {…}}` (arguments in sorted order; an
/// assistant turn with a call drops its text, as the Jinja does), a tool
/// result as a JSON string in an `ipython` turn. What it cannot do as the
/// Jinja does: trim the messages' whitespace, and write a property's other
/// schema keys (`enum`, `items`).
const LLAMA3_TOOLS: &str = concat!(
    "{{- $tools := .Tools }}{{ $system := \"\" }}{{ $first := true }}\n",
    "{{- if eq (index .Messages 0).Role \"system\" }}{{ $system = (index .Messages 0).Content }}{{ end -}}\n",
    "<|start_header_id|>system<|end_header_id|>\n\n",
    "{{ if $tools }}Environment: ipython\n{{ end }}Cutting Knowledge Date: December 2023\n",
    "Today Date: 26 Jul 2024\n\n{{ $system }}<|eot_id|>\n",
    "{{- range $i, $m := .Messages }}\n",
    "{{- if and (eq $i 0) (eq .Role \"system\") }}\n",
    "{{- else if and $tools $first }}{{ $first = false }}<|start_header_id|>user<|end_header_id|>\n\n",
    "Given the following functions, please respond with a JSON for a function call with its proper arguments ",
    "that best answers the given prompt.\n\n",
    "Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its value}.",
    "Do not use variables.\n\n",
    "{{ range $tools }}{\n",
    "    \"type\": \"function\",\n",
    "    \"function\": {\n",
    "        \"name\": {{ printf \"%q\" .Function.Name }},\n",
    "        \"description\": {{ printf \"%q\" .Function.Description }},\n",
    "        \"parameters\": {\n",
    "            \"type\": \"object\",\n",
    "            \"properties\": {{ if .Function.Parameters.Properties }}{{ \"{\" }}",
    "{{- $sep := \"\" }}{{ range $k, $p := .Function.Parameters.Properties }}{{ $sep }}\n",
    "                {{ printf \"%q\" $k }}: {\n",
    "                    \"type\": {{ printf \"%q\" (print $p.Type) }},\n",
    "                    \"description\": {{ printf \"%q\" $p.Description }}\n",
    "                }",
    "{{- $sep = \",\" }}{{ end }}\n",
    "            }{{ else }}{}{{ end }},\n",
    "            \"required\": {{ if .Function.Parameters.Required }}[",
    "{{- range $j, $r := .Function.Parameters.Required }}{{ if $j }},{{ end }}\n",
    "                {{ printf \"%q\" $r }}{{ end }}\n",
    "            ]{{ else }}[]{{ end }}\n",
    "        }\n",
    "    }\n",
    "}\n\n",
    "{{ end }}{{ .Content }}<|eot_id|>\n",
    "{{- else if eq .Role \"assistant\" }}<|start_header_id|>assistant<|end_header_id|>\n\n",
    "{{ if .ToolCalls }}{{ range .ToolCalls }}{\"name\": \"{{ .Function.Name }}\", \"parameters\": {{ \"{\" }}",
    python_json_arguments!(),
    "}}",
    "{{- end }}{{ else }}{{ .Content }}{{ end }}<|eot_id|>\n",
    "{{- else if eq .Role \"tool\" }}<|start_header_id|>ipython<|end_header_id|>\n\n",
    "{{ printf \"%q\" .Content }}<|eot_id|>\n",
    "{{- else }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n",
    "{{ .Content }}<|eot_id|>\n",
    "{{- end }}\n",
    "{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
);

impl Family {
    /// Recognizes the family of a Jinja chat template.
    pub fn of(jinja: &str) -> Option<Family> {
        if jinja.contains("<start_of_turn>") && jinja.contains("<tool_response>") {
            Some(Family::GemmaTools)
        } else if jinja.contains("<start_of_turn>") {
            Some(Family::Gemma)
        } else if jinja.contains("<|im_start|>") && jinja.contains("<tool_call>") {
            Some(Family::QwenTools)
        } else if jinja.contains("<|im_start|>") {
            Some(Family::ChatMl)
        } else if jinja.contains("<|start_header_id|>") && jinja.contains("tool_calls") {
            Some(Family::Llama3Tools)
        } else if jinja.contains("### Instruction") {
            Some(Family::Alpaca)
        } else {
            None
        }
    }

    /// The Go template (Ollama's `TEMPLATE`). Ollama's tokenizer adds BOS
    /// itself, so the template does not write it.
    pub fn go_template(self, eos: &str) -> String {
        match self {
            Family::Gemma => concat!(
                "{{- range $i, $m := .Messages }}\n",
                "{{- if eq $m.Role \"user\" }}<start_of_turn>user\n",
                "{{ if and (eq $i 1) (eq (index $.Messages 0).Role \"system\") }}{{ (index $.Messages 0).Content }}\n\n",
                "{{ end }}{{ $m.Content }}<end_of_turn>\n",
                "{{ else if eq $m.Role \"assistant\" }}<start_of_turn>model\n",
                "{{ $m.Content }}<end_of_turn>\n",
                "{{ end }}\n",
                "{{- end }}<start_of_turn>model\n"
            )
            .to_string(),
            Family::GemmaTools => GEMMA_TOOLS.to_string(),
            Family::QwenTools => QWEN_TOOLS.to_string(),
            Family::Llama3Tools => LLAMA3_TOOLS.to_string(),
            Family::ChatMl => concat!(
                "{{- range .Messages }}<|im_start|>{{ .Role }}\n",
                "{{ .Content }}<|im_end|>\n",
                "{{ end }}<|im_start|>assistant\n"
            )
            .to_string(),
            Family::Alpaca => format!(
                concat!(
                    "{{{{- range .Messages }}}}\n",
                    "{{{{- if eq .Role \"system\" }}}}{{{{ .Content }}}}\n\n",
                    "{{{{ else if eq .Role \"user\" }}}}### Instruction:\n{{{{ .Content }}}}\n\n### Input:\n\n### Response:\n",
                    "{{{{ else if eq .Role \"assistant\" }}}}{{{{ .Content }}}}{eos}\n\n",
                    "{{{{ end }}}}\n",
                    "{{{{- end }}}}"
                ),
                eos = eos
            ),
        }
    }
}

/// What a Modelfile states.
#[derive(Debug, Clone)]
pub struct Modelfile {
    /// The recipe it was generated from (named in a comment).
    pub recipe: String,
    pub family: Family,
    /// A LoRA adapter (`./adapter.gguf`) applied on `./model.gguf`.
    pub adapter: bool,
    /// The EOS token (Alpaca-style templates write it after answers).
    pub eos: String,
    pub stops: Vec<String>,
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub repeat_penalty: Option<f64>,
    pub num_ctx: usize,
    pub system: Option<String>,
}

impl Modelfile {
    /// The Modelfile text, serving `./model.gguf` (and `./adapter.gguf` on it).
    pub fn render(&self) -> String {
        let mut s = format!(
            "# Generated by pipeline from recipe `{}`: the template renders conversations as training did.\n\
             FROM ./model.gguf\n{}\nTEMPLATE \"\"\"{}\"\"\"\n\n",
            self.recipe,
            if self.adapter { "ADAPTER ./adapter.gguf\n" } else { "" },
            self.family.go_template(&self.eos)
        );
        for stop in &self.stops {
            s += &format!("PARAMETER stop {}\n", serde_json::to_string(stop).expect("string"));
        }
        s += &format!("PARAMETER temperature {}\n", self.temperature);
        if let Some(k) = self.top_k {
            s += &format!("PARAMETER top_k {k}\n");
        }
        if let Some(p) = self.top_p {
            s += &format!("PARAMETER top_p {p}\n");
        }
        if let Some(r) = self.repeat_penalty {
            s += &format!("PARAMETER repeat_penalty {r}\n");
        }
        s += &format!("PARAMETER num_ctx {}\n", self.num_ctx);
        if let Some(sys) = &self.system {
            s += &format!("\nSYSTEM \"\"\"{sys}\"\"\"\n");
        }
        s
    }
}
