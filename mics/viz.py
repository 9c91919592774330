"""Pictures of a search tree: a self-contained HTML page (inline SVG, CSS and JS) and DOT.

The HTML page needs no network: the tree is embedded as JSON and drawn by inline JS. Clicking a
node shows its step text, intern answers and verdicts. A hidden ``#mics-status`` element
reports ``data-nodes`` (nodes drawn), ``data-errors`` (script errors seen) and ``data-ready``,
so a headless browser can check the page from its DOM. Opening the page with
``#node=<node id>`` selects that node as a click would.
"""

from __future__ import annotations

import colorsys
import hashlib
import html
import json
import re
from pathlib import Path
from typing import Any

import networkx as nx

from mics.analysis import tree_json, tree_summary

__all__ = ["index_html", "page_name", "score_color", "to_dot", "tree_html", "write_all"]


def score_color(score: float, root: bool = False) -> str:
    """Red (0) to green (1) as #rrggbb; grey for a root."""
    if root:
        return "#9ca3af"
    r, g, b = colorsys.hls_to_rgb(max(0.0, min(1.0, score)) / 3, 0.45, 0.65)
    return f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}"


def page_name(qid: str) -> str:
    """A safe file name for a question's page (a hash is added when the id had to change)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", qid).lstrip(".")[:80]
    if safe != qid or not safe:
        safe = f"{safe}-{hashlib.sha1(qid.encode()).hexdigest()[:8]}"
    return f"tree-{safe}.html"


# ---------------------------------------------------------------- DOT


def _dq(text: Any) -> str:
    s = str(text).replace("\\", "\\\\").replace('"', '\\"')
    return '"' + s.replace("\r", "").replace("\n", "\\n") + '"'


def _attrs(attrs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_dq(v)}" for k, v in attrs.items())


def to_dot(g: nx.DiGraph) -> str:
    """Graphviz DOT of one tree: scores and mentors as labels, the chosen path in bold blue."""
    s = tree_summary(g)
    title = f"{s['qid']}: {s['stop']} ({s['node_count']} nodes)"
    lines = [f"digraph {_dq('mics_' + s['qid'])} {{",
             f"  graph [{_attrs({'rankdir': 'TB', 'label': title, 'labelloc': 't'})}];",
             '  node [shape="box", style="rounded,filled", fontname="Helvetica", fontsize="10"];',
             '  edge [color="#9ca3af"];']
    for n, a in g.nodes(data=True):
        label = ("root" if a["root"] else
                 f"d{a['depth']} {a['mentor']}\n{a['score']:.2f} ({a['correct']}/{a['total']})")
        attrs = {"label": label, "fillcolor": score_color(a["score"], a["root"]),
                 "fontcolor": "white", "tooltip": a["step"][:500], "mentor": a["mentor"] or "",
                 "depth": a["depth"], "score": f"{a['score']:.6g}", "chosen": str(a["chosen"]),
                 "on_path": str(a["on_path"])}
        if a["on_path"]:
            attrs.update(color="#1d4ed8", penwidth="3")
        lines.append(f"  {_dq(n)} [{_attrs(attrs)}];")
    for u, v, a in g.edges(data=True):
        extra = f" [{_attrs({'color': '#1d4ed8', 'penwidth': '3'})}]" if a["on_path"] else ""
        lines.append(f"  {_dq(u)} -> {_dq(v)}{extra};")
    lines.append("}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- HTML

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#111827;background:#fff}
header{padding:12px 18px;border-bottom:1px solid #e5e7eb}
header h1{font-size:18px;margin:0 0 6px}
header p{margin:2px 0}
.muted{color:#6b7280}
#main{display:flex;align-items:flex-start}
#canvas{flex:1 1 auto;overflow:auto;padding:8px;min-width:0}
#canvas svg{max-width:100%;height:auto}
#detail{flex:0 0 380px;border-left:1px solid #e5e7eb;padding:12px 16px;min-height:300px;
  max-height:90vh;overflow:auto}
#detail pre{white-space:pre-wrap;background:#f9fafb;border:1px solid #e5e7eb;padding:8px;
  font-size:12px}
table{border-collapse:collapse;font-size:12px}
td,th{border:1px solid #e5e7eb;padding:3px 6px;text-align:left;vertical-align:top}
.node{cursor:pointer}
.node circle{stroke:#374151;stroke-width:1.5}
.node.path circle{stroke:#1d4ed8;stroke-width:5}
.node.reused circle{stroke-dasharray:4 3}
.node.leak text.score{fill:#fde047}
.leak-note{color:#b45309;font-weight:600}
.node.selected circle{stroke:#f59e0b;stroke-width:5}
.node text{font-size:11px;text-anchor:middle;pointer-events:none}
.node .score{fill:#fff;font-weight:600}
.edge{stroke:#9ca3af;stroke-width:1.5;fill:none}
.level{font-size:11px;fill:#9ca3af}
.edge.path{stroke:#1d4ed8;stroke-width:4}
.yes{color:#15803d;font-weight:600}.no{color:#b91c1c}
.legend span{display:inline-block;margin-right:14px}
.swatch{display:inline-block;width:12px;height:12px;border-radius:6px;vertical-align:middle;
  margin-right:4px}
"""

_GUARD = """
(function(){var s=document.getElementById('mics-status'),n=0;
function bump(){n+=1;s.setAttribute('data-errors',String(n));}
window.addEventListener('error',bump);window.addEventListener('unhandledrejection',bump);
var e=console.error;console.error=function(){bump();return e.apply(console,arguments);};})();
"""

_DRAW = r"""
(function(){
var data=JSON.parse(document.getElementById('mics-data').textContent);
var status=document.getElementById('mics-status');
var NS='http://www.w3.org/2000/svg',DX=110,DY=110,R=26,M=50,L=40;
var byId={},kids={},hasParent={},pos={},drawn={};
data.nodes.forEach(function(n){byId[n.id]=n;kids[n.id]=[];});
data.edges.forEach(function(e){if(byId[e.source]&&byId[e.target]){
  kids[e.source].push(e.target);hasParent[e.target]=true;}});
var slot=0,maxDepth=0;
function place(id){var n=byId[id],c=kids[id];maxDepth=Math.max(maxDepth,n.depth);
  if(!c.length){pos[id]={x:slot,y:n.depth};slot+=1;return;}
  c.forEach(place);
  var xs=c.map(function(k){return pos[k].x;});
  pos[id]={x:(Math.min.apply(null,xs)+Math.max.apply(null,xs))/2,y:n.depth};}
data.nodes.forEach(function(n){if(!hasParent[n.id]){place(n.id);slot+=0.5;}});
var svg=document.createElementNS(NS,'svg');
var W=Math.max(1,slot)*DX+2*M+L,H=(maxDepth+1)*DY+2*M;
svg.setAttribute('width',W);svg.setAttribute('height',H);
svg.setAttribute('viewBox','0 0 '+W+' '+H);svg.setAttribute('id','tree');
function el(tag,attrs,parent){var x=document.createElementNS(NS,tag);
  for(var k in attrs){x.setAttribute(k,attrs[k]);}parent.appendChild(x);return x;}
function px(id){return L+M+pos[id].x*DX+DX/2;}function py(id){return M+pos[id].y*DY+R;}
data.edges.forEach(function(e){if(!pos[e.source]||!pos[e.target])return;
  var x1=px(e.source),y1=py(e.source),x2=px(e.target),y2=py(e.target),ym=(y1+y2)/2;
  el('path',{'class':'edge'+(e.on_path?' path':''),
    d:'M'+x1+','+(y1+R+18)+' C'+x1+','+(ym+9)+' '+x2+','+(ym+9)+' '+x2+','+(y2-R)},svg);});
for(var lv=0;lv<=maxDepth;lv++){var lt=el('text',{x:8,y:M+lv*DY+R+4,'class':'level'},svg);
  lt.textContent=lv?('depth '+lv):'root';}
function color(n){if(n.root)return '#9ca3af';
  var h=Math.max(0,Math.min(1,n.score))*120;return 'hsl('+h+',65%,45%)';}
var selected=null;
data.nodes.forEach(function(n){
  var cls='node'+(n.on_path?' path':'')+(n.reused?' reused':'')+(n.leaks_answer?' leak':'');
  var g=el('g',{'class':cls,'data-id':n.id,tabindex:'0',role:'button'},svg);
  el('circle',{cx:px(n.id),cy:py(n.id),r:R,fill:color(n)},g);
  var t=el('text',{x:px(n.id),y:py(n.id)+4,'class':'score'},g);
  t.textContent=n.root?'root':(n.leaks_answer?'\u26a0 ':'')+n.score.toFixed(2);
  var l=el('text',{x:px(n.id),y:py(n.id)+R+14},g);
  l.textContent=n.root?('attempt '+n.attempt):(n.mentor||'?');
  var tip=el('title',{},g);tip.textContent=n.id;
  function pick(){if(selected)selected.classList.remove('selected');
    selected=g;g.classList.add('selected');show(n);}
  g.addEventListener('click',pick);
  g.addEventListener('keydown',function(ev){if(ev.key==='Enter'||ev.key===' ')pick();});
  drawn[n.id]=true;});
document.getElementById('canvas').appendChild(svg);
function add(parent,tag,text,cls){var x=document.createElement(tag);
  if(text!==undefined&&text!==null)x.textContent=String(text);if(cls)x.className=cls;
  parent.appendChild(x);return x;}
function show(n){var d=document.getElementById('detail');d.textContent='';
  add(d,'h2',n.root?'root':('depth '+n.depth+' \u00b7 '+(n.mentor||'?')));
  add(d,'p',n.id,'muted');
  if(!n.root){add(d,'p','MICS-Score '+n.score.toFixed(3)+' ('+n.correct+'/'+n.total+
    ' correct)'+(n.chosen?' \u00b7 chosen':'')+(n.reused?' \u00b7 reused step':''));}
  if(n.leaks_answer){add(d,'p','\u26a0 this step states the correct answer (answer leak)',
    'leak-note');}
  add(d,'h3','Step');add(d,'pre',n.step);
  if(n.samples.length){add(d,'h3','Intern samples');var tb=add(d,'table');
    var hr=add(tb,'tr');['intern','temp','answer','verdict'].forEach(function(h){add(hr,'th',h);});
    n.samples.forEach(function(s){var r=add(tb,'tr');add(r,'td',s.intern);add(r,'td',s.temperature);
      add(r,'td',s.answer===null?'(none)':s.answer);
      add(r,'td',s.verdict+(s.correct?' \u2713':' \u2717'),s.correct?'yes':'no');});}
  var u=n.usage||{},m=u.mentor||{},i=u.interns||{};
  add(d,'p','tokens: mentor '+(m.prompt_tokens||0)+' in / '+(m.completion_tokens||0)+
    ' out; interns '+(i.prompt_tokens||0)+' in / '+(i.completion_tokens||0)+' out','muted');}
var path=data.nodes.filter(function(n){return n.on_path;})
  .sort(function(a,b){return a.depth-b.depth;});
if(path.length){var last=path[path.length-1];
  var g0=svg.querySelector('g.node[data-id="'+CSS.escape(last.id)+'"]');
  if(g0){g0.classList.add('selected');selected=g0;}show(last);}
var want=(location.hash.match(/^#node=(.+)$/)||[])[1];
if(want){var gw=svg.querySelector('g.node[data-id="'+CSS.escape(decodeURIComponent(want))+'"]');
  if(gw)gw.dispatchEvent(new MouseEvent('click',{bubbles:true}));}
status.setAttribute('data-nodes',String(svg.querySelectorAll('g.node').length));
status.setAttribute('data-ready','1');
})();
"""


def _script_json(value: Any) -> str:
    """JSON safe to embed in a <script> element."""
    text = json.dumps(value, ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _mentor_errors(data: dict[str, Any]) -> str:
    rows = data.get("mentor_errors") or []
    if not rows:
        return ""
    items = "".join(f"<li>depth {html.escape(r['depth'])} · <b>{html.escape(r['mentor'])}</b>: "
                    f"{html.escape(r['error'])}</li>" for r in rows)
    return f'<div class="mentor-errors"><b>Mentor errors:</b><ul>{items}</ul></div>'


def tree_html(g: nx.DiGraph, title: str | None = None) -> str:
    """One self-contained HTML page drawing a question's tree."""
    data = tree_json(g)
    e = html.escape
    title = title or f"MICS tree {data['qid']}"
    path = " → ".join(data["path_mentors"]) or "—"
    trajectory = ", ".join(f"{x:.2f}" for x in data["score_trajectory"]) or "—"
    legend = "".join(f'<span><i class="swatch" style="background:{score_color(x)}"></i>{x:g}'
                     "</span>" for x in (0.0, 0.5, 1.0))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{_CSS}</style></head>
<body>
<div id="mics-status" hidden data-errors="0" data-nodes="0" data-ready="0"></div>
<script>{_GUARD}</script>
<header><h1>{e(title)}</h1>
<p><b>Question:</b> {e(data['question'])}</p>
<p><b>Ground truth:</b> {e(data['gt_answer'])}</p>
<p><b>Stop:</b> {e(data['stop'])} · <b>nodes:</b> {data['node_count']} ·
<b>attempts:</b> {data['attempts']} · <b>chosen path:</b> {e(path)} ·
<b>scores:</b> {e(trajectory)}</p>
{_mentor_errors(data)}
<p class="legend muted">MICS-Score {legend}<span>blue ring: chosen path</span>
<span>dashed: reused step</span><span>⚠: step states the answer</span>
<span>click a node for details</span></p>
</header>
<div id="main"><div id="canvas"></div><aside id="detail"><p class="muted">Click a node.</p>
</aside></div>
<script type="application/json" id="mics-data">{_script_json(data)}</script>
<script>{_DRAW}</script>
</body></html>
"""


def index_html(run: str, summaries: list[dict[str, Any]]) -> str:
    """An index page linking every question's page, with stop reason and depth."""
    e = html.escape
    rows = "\n".join(
        f"<tr><td><a href=\"{e(page_name(s['qid']))}\">{e(s['qid'])}</a></td>"
        f"<td>{e(s['status'])}</td><td>{e(s['stop'])}</td><td>{s['depth']}</td>"
        f"<td>{s['node_count']}</td><td>{e(' → '.join(s['path_mentors']))}</td>"
        f"<td>{e(', '.join(f'{x:.2f}' for x in s['score_trajectory']))}</td></tr>"
        for s in summaries)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>MICS run {e(run)}</title>
<style>{_CSS} body{{padding:16px}}</style></head>
<body><h1>MICS run {e(run)}</h1><p class="muted">{len(summaries)} questions</p>
<table><tr><th>question</th><th>status</th><th>stop</th><th>depth</th><th>nodes</th>
<th>chosen path</th><th>scores</th></tr>
{rows}
</table></body></html>
"""


def write_all(trees: list[nx.DiGraph], out_dir: Path, run: str, fmt: str = "html"
              ) -> list[Path]:
    """One page (or .dot file) per question, plus index.html for HTML; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for g in trees:
        name = page_name(g.graph["qid"])
        if fmt == "dot":
            path = out_dir / (name[: -len(".html")] + ".dot")
            path.write_text(to_dot(g), encoding="utf-8")
        else:
            path = out_dir / name
            path.write_text(tree_html(g), encoding="utf-8")
        written.append(path)
    if fmt == "html":
        index = out_dir / "index.html"
        index.write_text(index_html(run, [tree_summary(g) for g in trees]), encoding="utf-8")
        written.append(index)
    return written
