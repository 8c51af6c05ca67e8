// Renders an Ollama Modelfile TEMPLATE the way Ollama's /api/chat does, with
// Go's own text/template: the template data Ollama builds from a request
// (messages with tool calls, tools, the collated system prompt), the
// template functions it defines, and the values' JSON printing. It also
// reports the tool-call tag Ollama derives from the template: the first
// non-blank text inside the first `if` on `.ToolCalls`, cut at `{`.
//
// A test harness written from Ollama's documented behaviour (api/types.go,
// template/template.go and tools/template.go at ollama/ollama fb30760):
// `go run render.go < requests.json` reads a list of {"template", "messages",
// "tools"} and prints a list of {"prompt", "tag", "uses_tools"}.
package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/template"
	"text/template/parse"
)

// propertyType prints as its one type, as Ollama's PropertyType does.
type propertyType []string

func (t *propertyType) UnmarshalJSON(b []byte) error {
	var one string
	if json.Unmarshal(b, &one) == nil {
		*t = propertyType{one}
		return nil
	}
	var many []string
	err := json.Unmarshal(b, &many)
	*t = many
	return err
}

func (t propertyType) MarshalJSON() ([]byte, error) {
	if len(t) == 1 {
		return json.Marshal(t[0])
	}
	return json.Marshal([]string(t))
}

func (t propertyType) String() string {
	if len(t) == 1 {
		return t[0]
	}
	if len(t) == 0 {
		return ""
	}
	return fmt.Sprintf("%v", []string(t))
}

type property struct {
	AnyOf       []property   `json:"anyOf,omitempty"`
	Type        propertyType `json:"type,omitempty"`
	Items       any          `json:"items,omitempty"`
	Description string       `json:"description,omitempty"`
	Enum        []any        `json:"enum,omitempty"`
}

// jsonString values print as compact JSON, as Ollama's template types do.
type properties map[string]property

func (p properties) String() string { b, _ := json.Marshal(p); return string(b) }

type args map[string]any

func (a args) String() string {
	if a == nil {
		return "{}"
	}
	b, _ := json.Marshal(a)
	return string(b)
}

type parameters struct {
	Type       string     `json:"type"`
	Required   []string   `json:"required,omitempty"`
	Properties properties `json:"properties"`
}

type function struct {
	Name        string     `json:"name"`
	Description string     `json:"description"`
	Parameters  parameters `json:"parameters"`
}

type tool struct {
	Type     string   `json:"type"`
	Function function `json:"function"`
}

func (t tool) String() string { b, _ := json.Marshal(t); return string(b) }

type tools []tool

func (t tools) String() string { b, _ := json.Marshal(t); return string(b) }

type callFunction struct {
	Index     int
	Name      string `json:"name"`
	Arguments args   `json:"arguments"`
}

type call struct {
	ID       string       `json:"id"`
	Function callFunction `json:"function"`
}

type message struct {
	Role       string `json:"role"`
	Content    string `json:"content"`
	Thinking   string
	ToolCalls  []call `json:"tool_calls"`
	ToolName   string `json:"name"`
	ToolCallID string `json:"tool_call_id"`
}

type request struct {
	Template string    `json:"template"`
	Messages []message `json:"messages"`
	Tools    tools     `json:"tools"`
}

var funcs = template.FuncMap{
	"json": func(v any) string { b, _ := json.Marshal(v); return string(b) },
}

// tag finds the tool-call tag as Ollama does ("{" when there is none).
func tag(t *template.Template) string {
	var inToolCalls func(nodes []parse.Node) *parse.IfNode
	isToolCalls := func(n *parse.IfNode) bool {
		for _, c := range n.Pipe.Cmds {
			for _, a := range c.Args {
				if f, ok := a.(*parse.FieldNode); ok {
					for _, id := range f.Ident {
						if id == "ToolCalls" {
							return true
						}
					}
				}
			}
		}
		return false
	}
	inToolCalls = func(nodes []parse.Node) *parse.IfNode {
		for _, node := range nodes {
			var lists []*parse.ListNode
			switch n := node.(type) {
			case *parse.IfNode:
				if isToolCalls(n) {
					return n
				}
				lists = []*parse.ListNode{n.List, n.ElseList}
			case *parse.RangeNode:
				lists = []*parse.ListNode{n.List, n.ElseList}
			case *parse.WithNode:
				lists = []*parse.ListNode{n.List, n.ElseList}
			case *parse.ListNode:
				lists = []*parse.ListNode{n}
			}
			for _, l := range lists {
				if l != nil {
					if r := inToolCalls(l.Nodes); r != nil {
						return r
					}
				}
			}
		}
		return nil
	}
	// The first non-blank text, not looking past an action or a block.
	var firstText func(nodes []parse.Node) (*parse.TextNode, bool)
	firstText = func(nodes []parse.Node) (*parse.TextNode, bool) {
		for _, node := range nodes {
			switch n := node.(type) {
			case *parse.TextNode:
				if len(bytes.TrimSpace(n.Text)) > 0 {
					return n, true
				}
			case *parse.ListNode:
				if t, stop := firstText(n.Nodes); stop {
					return t, true
				}
			case *parse.IfNode, *parse.RangeNode, *parse.WithNode:
				var b *parse.BranchNode
				switch x := n.(type) {
				case *parse.IfNode:
					b = &x.BranchNode
				case *parse.RangeNode:
					b = &x.BranchNode
				case *parse.WithNode:
					b = &x.BranchNode
				}
				if t, _ := firstText(b.List.Nodes); t != nil {
					return t, true
				}
				if b.ElseList != nil {
					if t, _ := firstText(b.ElseList.Nodes); t != nil {
						return t, true
					}
				}
				return nil, true
			case *parse.ActionNode:
				return nil, true
			}
		}
		return nil, false
	}
	node := inToolCalls(t.Tree.Root.Nodes)
	if node == nil {
		return "{"
	}
	text, _ := firstText(node.List.Nodes)
	if text == nil {
		return "{"
	}
	s := strings.ReplaceAll(string(text.Text), "\r\n", "\n")
	s, _, _ = strings.Cut(s, "{")
	if s = strings.TrimSpace(s); s == "" {
		return "{"
	}
	return s
}

// usesTools: whether the template names `.Tools` (Ollama refuses a request's
// tools otherwise).
func usesTools(t *template.Template) bool {
	found := false
	var walk func(n parse.Node)
	walk = func(n parse.Node) {
		switch x := n.(type) {
		case *parse.ListNode:
			if x != nil {
				for _, c := range x.Nodes {
					walk(c)
				}
			}
		case *parse.ActionNode:
			walk(x.Pipe)
		case *parse.IfNode:
			walk(x.Pipe)
			walk(x.List)
			if x.ElseList != nil {
				walk(x.ElseList)
			}
		case *parse.RangeNode:
			walk(x.Pipe)
			walk(x.List)
			if x.ElseList != nil {
				walk(x.ElseList)
			}
		case *parse.WithNode:
			walk(x.Pipe)
			walk(x.List)
			if x.ElseList != nil {
				walk(x.ElseList)
			}
		case *parse.PipeNode:
			if x == nil {
				return
			}
			for _, c := range x.Cmds {
				for _, a := range c.Args {
					if f, ok := a.(*parse.FieldNode); ok {
						for _, id := range f.Ident {
							found = found || strings.EqualFold(id, "tools")
						}
					}
					if p, ok := a.(*parse.PipeNode); ok {
						walk(p)
					}
				}
			}
		}
	}
	walk(t.Tree.Root)
	return found
}

func main() {
	var reqs []request
	if err := json.NewDecoder(os.Stdin).Decode(&reqs); err != nil {
		fmt.Fprintln(os.Stderr, "requests:", err)
		os.Exit(2)
	}
	var results []map[string]any
	for i, req := range reqs {
		r, err := render(req)
		if err != nil {
			fmt.Fprintf(os.Stderr, "request %d: %v\n", i, err)
			os.Exit(2)
		}
		results = append(results, r)
	}
	json.NewEncoder(os.Stdout).Encode(results)
}

func render(req request) (map[string]any, error) {
	t, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(req.Template)
	if err != nil {
		return nil, err
	}
	// Ollama collects every system message into .System (joined by blank
	// lines) and merges consecutive messages of one role, tool results aside.
	var system []string
	var msgs []*message
	for i := range req.Messages {
		m := &req.Messages[i]
		if m.Role == "system" {
			system = append(system, m.Content)
		}
		if n := len(msgs); n > 0 && msgs[n-1].Role == m.Role && m.Role != "tool" {
			msgs[n-1].Content += "\n\n" + m.Content
		} else {
			msgs = append(msgs, m)
		}
	}
	var toolsValue tools
	if len(req.Tools) > 0 {
		toolsValue = req.Tools
	}
	var out bytes.Buffer
	err = t.Execute(&out, map[string]any{
		"System":   strings.Join(system, "\n\n"),
		"Messages": msgs,
		"Tools":    toolsValue,
		"Response": "",
	})
	if err != nil {
		return nil, err
	}
	return map[string]any{"prompt": out.String(), "tag": tag(t), "uses_tools": usesTools(t)}, nil
}
