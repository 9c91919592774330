"""Pictures of a search tree: a self-contained HTML page (inline SVG, CSS and JS) and DOT.

The HTML page needs no network: the tree is embedded as JSON and drawn by inline JS. Hovering a
node shows its step text; clicking shows the step, intern answers and verdicts. A failed question
opens on where it failed; a mentor whose call failed is drawn (dashed, ✗) with its error; a step
flagged ``leaks_answer`` is ringed in red. Wheel/buttons zoom and dragging pans, so deep trees
keep readable labels. ``#hover=<node id>`` and ``#zoom=<scale>`` drive hover and zoom from a
headless browser. A hidden ``#mics-status`` element
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

__all__ = ["contrast", "index_html", "ink_for", "page_name", "score_color", "to_dot", "tree_html",
           "write_all"]


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
        fill = score_color(a["score"], a["root"])
        attrs = {"label": label, "fillcolor": fill, "fontcolor": ink_for(fill),
                 "tooltip": a["step"][:500], "mentor": a["mentor"] or "",
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
.failed{color:#b91c1c;font-weight:600}
#main{display:flex;align-items:flex-start}
#canvas{flex:1 1 auto;padding:8px;min-width:0;position:relative}
#canvas svg{display:block;width:100%;border:1px solid #f3f4f6;cursor:grab;touch-action:none}
#canvas svg.dragging{cursor:grabbing}
#zoom{position:absolute;top:14px;right:16px;display:flex;gap:4px}
#zoom button{font:13px system-ui,sans-serif;min-width:30px;padding:3px 8px;
  border:1px solid #d1d5db;background:#fff;border-radius:4px;cursor:pointer}
#hover{position:fixed;display:none;max-width:420px;max-height:260px;overflow:hidden;z-index:5;
  background:#111827;color:#f9fafb;font-size:12px;line-height:1.35;padding:8px 10px;
  border-radius:6px;white-space:pre-wrap;pointer-events:none;box-shadow:0 4px 14px #0004}
#detail{flex:0 0 380px;border-left:1px solid #e5e7eb;padding:12px 16px;min-height:300px;
  max-height:90vh;overflow:auto}
#detail pre{white-space:pre-wrap;background:#f9fafb;border:1px solid #e5e7eb;padding:8px;
  font-size:12px}
#detail .failure{border:1px solid #fecaca;background:#fef2f2;padding:6px 10px;margin-bottom:10px}
table{border-collapse:collapse;font-size:12px}
td,th{border:1px solid #e5e7eb;padding:3px 6px;text-align:left;vertical-align:top}
.node{cursor:pointer}
.node circle{stroke:#374151;stroke-width:1.5}
.node.path circle{stroke:#1d4ed8;stroke-width:5}
.node.reused circle{stroke-dasharray:4 3}
.node.selected circle{stroke:#f59e0b;stroke-width:5}
.node .leak{fill:none;stroke:#dc2626;stroke-width:3;stroke-dasharray:5 3}
.node text{font-size:11px;text-anchor:middle;pointer-events:none}
.node .score{font-weight:600}
.node .flag{fill:#b91c1c;font-weight:700}
.ghost circle{fill:#f3f4f6;stroke:#6b7280;stroke-width:1.5;stroke-dasharray:3 3}
.ghost.selected circle{stroke:#f59e0b;stroke-width:5;stroke-dasharray:none}
.ghost text{font-size:11px;text-anchor:middle;pointer-events:none;fill:#374151}
.ghost .x{fill:#b91c1c;font-size:16px;font-weight:700}
.ghost{cursor:pointer}
.edge{stroke:#9ca3af;stroke-width:1.5;fill:none}
.edge.ghost-edge{stroke-dasharray:4 4}
.level{font-size:11px;fill:#6b7280}
.edge.path{stroke:#1d4ed8;stroke-width:4}
.yes{color:#15803d;font-weight:600}.no{color:#b91c1c}
.legend span{display:inline-block;margin-right:14px}
.swatch{display:inline-block;width:12px;height:12px;border-radius:6px;vertical-align:middle;
  margin-right:4px}
.ring{display:inline-block;width:10px;height:10px;border-radius:7px;vertical-align:middle;
  margin-right:4px;background:#fff}
.r-path{border:3px solid #1d4ed8}.r-sel{border:3px solid #f59e0b}
.r-reused{border:2px dashed #374151}.r-leak{border:2px dashed #dc2626}
.r-ghost{border:2px dashed #6b7280;background:#f3f4f6}
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
var all=data.nodes.concat(data.ghosts||[]);
all.forEach(function(n){byId[n.id]=n;kids[n.id]=[];});
data.edges.forEach(function(e){if(byId[e.source]&&byId[e.target]){
  kids[e.source].push(e.target);hasParent[e.target]=true;}});
(data.ghosts||[]).forEach(function(gh){if(byId[gh.parent]){kids[gh.parent].push(gh.id);
  hasParent[gh.id]=true;}});
var slot=0,maxDepth=0;
function place(id){var n=byId[id],c=kids[id];maxDepth=Math.max(maxDepth,n.depth);
  if(!c.length){pos[id]={x:slot,y:n.depth};slot+=1;return;}
  c.forEach(place);
  var xs=c.map(function(k){return pos[k].x;});
  pos[id]={x:(Math.min.apply(null,xs)+Math.max.apply(null,xs))/2,y:n.depth};}
all.forEach(function(n){if(!hasParent[n.id]){place(n.id);slot+=0.5;}});
var svg=document.createElementNS(NS,'svg');
var W=Math.max(1,slot)*DX+2*M+L,H=(maxDepth+1)*DY+2*M;
svg.setAttribute('id','tree');
function el(tag,attrs,parent){var x=document.createElementNS(NS,tag);
  for(var k in attrs){x.setAttribute(k,attrs[k]);}parent.appendChild(x);return x;}
var view=el('g',{id:'viewport'},svg);
function px(id){return L+M+pos[id].x*DX+DX/2;}function py(id){return M+pos[id].y*DY+R;}
function edge(a,b,cls){var x1=px(a),y1=py(a),x2=px(b),y2=py(b),ym=(y1+y2)/2;
  el('path',{'class':cls,
    d:'M'+x1+','+(y1+R+18)+' C'+x1+','+(ym+9)+' '+x2+','+(ym+9)+' '+x2+','+(y2-R)},view);}
data.edges.forEach(function(e){if(pos[e.source]&&pos[e.target])
  edge(e.source,e.target,'edge'+(e.on_path?' path':''));});
(data.ghosts||[]).forEach(function(gh){if(pos[gh.parent])edge(gh.parent,gh.id,'edge ghost-edge');});
for(var lv=0;lv<=maxDepth;lv++){var lt=el('text',{x:8,y:M+lv*DY+R+4,'class':'level'},view);
  lt.textContent=lv?('depth '+lv):'root';}
var hover=document.getElementById('hover');
function clip(t,n){t=String(t||'');return t.length>n?t.slice(0,n-1)+'\u2026':t;}
function tipText(n){if(n.ghost)return (n.mentor||'?')+': call failed\n'+n.error;
  return (n.root?'root':('depth '+n.depth+' \u00b7 '+(n.mentor||'?')+' \u00b7 score '+
    n.score.toFixed(2)))+(n.leaks_answer?'\n\u26a0 this step leaks the answer':'')+
    '\n\n'+clip(n.step,700);}
function showTip(n,ev){hover.textContent=tipText(n);hover.style.display='block';
  var x=ev&&ev.clientX!==undefined?ev.clientX:0,y=ev&&ev.clientY!==undefined?ev.clientY:0;
  hover.style.left=Math.min(x+14,Math.max(0,window.innerWidth-440))+'px';
  hover.style.top=Math.min(y+14,Math.max(0,window.innerHeight-270))+'px';
  hover.setAttribute('data-for',n.id);}
function hideTip(){hover.style.display='none';hover.removeAttribute('data-for');}
var selected=null,groups={};
function pick(g,n){if(selected)selected.classList.remove('selected');
  selected=g;g.classList.add('selected');show(n);}
function wire(g,n){g.addEventListener('click',function(){pick(g,n);});
  g.addEventListener('keydown',function(ev){if(ev.key==='Enter'||ev.key===' ')pick(g,n);});
  g.addEventListener('mouseenter',function(ev){showTip(n,ev);});
  g.addEventListener('mousemove',function(ev){showTip(n,ev);});
  g.addEventListener('focus',function(){showTip(n);});
  g.addEventListener('mouseleave',hideTip);g.addEventListener('blur',hideTip);
  groups[n.id]=g;}
data.nodes.forEach(function(n){
  var cls='node'+(n.on_path?' path':'')+(n.reused?' reused':'')+(n.leaks_answer?' leaks':'');
  var g=el('g',{'class':cls,'data-id':n.id,tabindex:'0',role:'button'},view);
  el('circle',{cx:px(n.id),cy:py(n.id),r:R,fill:n.fill},g);
  if(n.leaks_answer)el('circle',{cx:px(n.id),cy:py(n.id),r:R+7,'class':'leak'},g);
  var t=el('text',{x:px(n.id),y:py(n.id)+4,'class':'score',fill:n.ink},g);
  t.textContent=n.root?'root':n.score.toFixed(2);
  var l=el('text',{x:px(n.id),y:py(n.id)+R+14},g);
  l.textContent=n.root?('attempt '+n.attempt):(n.mentor||'?');
  if(n.leaks_answer){var f=el('text',{x:px(n.id),y:py(n.id)-R-10,'class':'flag'},g);
    f.textContent='\u26a0 leak';}
  var tip=el('title',{},g);tip.textContent=n.id;
  wire(g,n);drawn[n.id]=true;});
(data.ghosts||[]).forEach(function(n){if(!pos[n.id])return;
  var g=el('g',{'class':'ghost','data-id':n.id,tabindex:'0',role:'button'},view);
  el('circle',{cx:px(n.id),cy:py(n.id),r:R},g);
  var x=el('text',{x:px(n.id),y:py(n.id)+6,'class':'x'},g);x.textContent='\u2717';
  var l=el('text',{x:px(n.id),y:py(n.id)+R+14},g);l.textContent=n.mentor||'?';
  var tip=el('title',{},g);tip.textContent=n.id;wire(g,n);});
var canvas=document.getElementById('canvas');canvas.appendChild(svg);
// zoom and pan: wheel or the buttons zoom about a point, dragging pans; text keeps its size
var scale=1,tx=0,ty=0,VH=Math.max(320,Math.min(H,Math.round(window.innerHeight*0.78)));
svg.setAttribute('height',VH);
function apply(){view.setAttribute('transform','translate('+tx+','+ty+') scale('+scale+')');
  svg.setAttribute('data-scale',scale.toFixed(3));}
function zoomAt(f,cx,cy){var s=Math.max(0.2,Math.min(4,scale*f));
  tx=cx-(cx-tx)*s/scale;ty=cy-(cy-ty)*s/scale;scale=s;apply();}
function fit(){var cw=svg.clientWidth||W;scale=Math.min(1,cw/W,VH/H);
  scale=Math.max(scale,0.2);tx=(cw-W*scale)/2;ty=0;apply();}
function clamp(v,lo,hi){return Math.max(Math.min(v,hi),Math.min(lo,hi));}
function center(id){if(!pos[id])return;var cw=svg.clientWidth||W;
  tx=clamp(cw/2-px(id)*scale,cw-W*scale,0);ty=clamp(VH/2-py(id)*scale,VH-H*scale,0);apply();}
svg.addEventListener('wheel',function(ev){ev.preventDefault();
  var r=svg.getBoundingClientRect();zoomAt(ev.deltaY<0?1.15:1/1.15,ev.clientX-r.left,
  ev.clientY-r.top);},{passive:false});
var drag=null;
svg.addEventListener('pointerdown',function(ev){
  if(ev.target.closest&&ev.target.closest('g.node,g.ghost'))return;drag={x:ev.clientX,y:ev.clientY,tx:tx,ty:ty};svg.classList.add('dragging');});
window.addEventListener('pointermove',function(ev){if(!drag)return;
  tx=drag.tx+ev.clientX-drag.x;ty=drag.ty+ev.clientY-drag.y;apply();});
window.addEventListener('pointerup',function(){drag=null;svg.classList.remove('dragging');});
function button(label,title,fn){var b=document.createElement('button');b.type='button';
  b.textContent=label;b.title=title;b.addEventListener('click',fn);
  document.getElementById('zoom').appendChild(b);return b;}
button('+','zoom in',function(){zoomAt(1.25,(svg.clientWidth||W)/2,VH/2);});
button('\u2212','zoom out',function(){zoomAt(0.8,(svg.clientWidth||W)/2,VH/2);});
button('fit','whole tree',fit);
button('1:1','actual size',function(){scale=1;if(selected)center(selected.getAttribute('data-id'));
  else{tx=0;ty=0;apply();}});
function add(parent,tag,text,cls){var x=document.createElement(tag);
  if(text!==undefined&&text!==null)x.textContent=String(text);if(cls)x.className=cls;
  parent.appendChild(x);return x;}
function failure(d){if(data.status!=='failed')return;var b=add(d,'div',null,'failure');
  add(b,'p','Failed: '+data.stop,'failed');if(data.error&&data.stop.indexOf(data.error)<0)
    add(b,'p',data.error);}
function show(n){var d=document.getElementById('detail');d.textContent='';
  failure(d);
  if(n.ghost){add(d,'h2','depth '+n.depth+' \u00b7 '+(n.mentor||'?'));add(d,'p',n.id,'muted');
    add(d,'p','This mentor proposed no step: its call failed.','failed');
    add(d,'h3','Error');add(d,'pre',n.error);return;}
  add(d,'h2',n.root?'root':('depth '+n.depth+' \u00b7 '+(n.mentor||'?')));
  add(d,'p',n.id,'muted');
  if(n.leaks_answer)add(d,'p','\u26a0 This step states the answer (a leak).','failed');
  if(!n.root){add(d,'p','MICS-Score '+n.score.toFixed(3)+' ('+n.correct+'/'+n.total+
    ' correct)'+(n.chosen?' \u00b7 chosen':'')+(n.reused?' \u00b7 reused step':''));}
  add(d,'h3','Step');add(d,'pre',n.step);
  if(n.samples.length){add(d,'h3','Intern samples');var tb=add(d,'table');
    var hr=add(tb,'tr');['intern','temp','answer','verdict'].forEach(function(h){add(hr,'th',h);});
    n.samples.forEach(function(s){var r=add(tb,'tr');add(r,'td',s.intern);add(r,'td',s.temperature);
      add(r,'td',s.answer===null?'(none)':s.answer);
      add(r,'td',s.verdict+(s.correct?' \u2713':' \u2717'),s.correct?'yes':'no');});}
  var u=n.usage||{},m=u.mentor||{},i=u.interns||{};
  add(d,'p','tokens: mentor '+(m.prompt_tokens||0)+' in / '+(m.completion_tokens||0)+
    ' out; interns '+(i.prompt_tokens||0)+' in / '+(i.completion_tokens||0)+' out','muted');}
fit();
// open on the chosen step, or on a failed question on where it failed
var start=null;
if(data.status==='failed'){var last=Math.max.apply(null,data.nodes.map(function(n){
    return n.attempt;}).concat([0]));
  var deep=data.nodes.filter(function(n){return n.attempt===last;})
    .sort(function(a,b){return (b.depth-a.depth)||(a.score-b.score);});
  var gl=(data.ghosts||[]).filter(function(g){return g.depth>=(deep.length?deep[0].depth:0);})
    .sort(function(a,b){return b.depth-a.depth;});
  start=gl.length?gl[0]:(deep.length?deep[0]:null);}
else{var path=data.nodes.filter(function(n){return n.on_path;})
  .sort(function(a,b){return a.depth-b.depth;});if(path.length)start=path[path.length-1];}
// a big tree is not shrunk to fit: labels stay readable (>= 90%), the start is centred
var fitted=scale;if(scale<0.9){scale=0.9;apply();}
if(start&&groups[start.id]){groups[start.id].classList.add('selected');selected=groups[start.id];
  show(start);if(scale>fitted||scale>=0.999)center(start.id);}
else if(data.status==='failed'){var d0=document.getElementById('detail');d0.textContent='';
  failure(d0);}
var want=(location.hash.match(/^#node=(.+)$/)||[])[1];
if(want){var gw=groups[decodeURIComponent(want)];
  if(gw)gw.dispatchEvent(new MouseEvent('click',{bubbles:true}));}
var hv=(location.hash.match(/^#hover=(.+)$/)||[])[1];
if(hv&&groups[decodeURIComponent(hv)]){var gh=groups[decodeURIComponent(hv)];
  var bb=gh.getBoundingClientRect();gh.dispatchEvent(new MouseEvent('mouseenter',
    {clientX:bb.left+bb.width/2,clientY:bb.top+bb.height/2}));}
var zm=(location.hash.match(/^#zoom=([0-9.]+)$/)||[])[1];
if(zm){var r0=svg.getBoundingClientRect();zoomAt(parseFloat(zm)/scale,r0.width/2,VH/2);}
status.setAttribute('data-nodes',String(svg.querySelectorAll('g.node').length));
status.setAttribute('data-ghosts',String(svg.querySelectorAll('g.ghost').length));
status.setAttribute('data-ready','1');
})();
"""


def _luminance(hex_color: str) -> float:
    def channel(c: int) -> float:
        x = c / 255
        return x / 12.92 if x <= 0.03928 else ((x + 0.055) / 1.055) ** 2.4

    r, g, b = (int(hex_color[i:i + 2], 16) for i in (1, 3, 5))
    return 0.2126 * channel(r) + 0.7152 * channel(g) + 0.0722 * channel(b)


def contrast(a: str, b: str) -> float:
    """WCAG contrast ratio of two #rrggbb colours (1 to 21)."""
    hi, lo = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


DARK_INK = "#000000"


def ink_for(fill: str) -> str:
    """White or near-black text, whichever reads better on ``fill``."""
    return "#ffffff" if contrast("#ffffff", fill) >= contrast(DARK_INK, fill) else DARK_INK


def _ghosts(g: nx.DiGraph) -> list[dict[str, Any]]:
    """Mentors whose call failed (no node was stored): where they would hang, and why."""
    details = g.graph.get("details") or {}
    by_depth = dict(details.get("mentor_errors_by_depth") or {})
    if not by_depth and details.get("mentor_errors") and details.get("depth") is not None:
        by_depth = {str(int(details["depth"]) + 1): details["mentor_errors"]}
    if not by_depth:
        return []
    last = max((a["attempt"] for _, a in g.nodes(data=True)), default=0)
    chosen = {a["depth"]: n for n, a in g.nodes(data=True)
              if a["attempt"] == last and a["chosen"]}
    out = []
    for depth, errors in sorted(by_depth.items(), key=lambda kv: int(kv[0])):
        parent = chosen.get(int(depth) - 1)
        for mentor, error in sorted(errors.items()):
            out.append({"id": f"a{last}.d{int(depth) - 1}.{mentor}.failed", "ghost": True,
                        "parent": parent, "depth": int(depth), "attempt": last,
                        "mentor": mentor, "error": str(error)})
    return out


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
    for n in data["nodes"]:
        n["fill"] = score_color(n["score"], n["root"])
        n["ink"] = ink_for(n["fill"])
    data["ghosts"] = _ghosts(g)
    stop_class = "failed" if data["status"] == "failed" else ""
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
<p><b>Stop:</b> <span class="{stop_class}">{e(data['stop'])}</span> ·
<b>nodes:</b> {data['node_count']} ·
<b>attempts:</b> {data['attempts']} · <b>chosen path:</b> {e(path)} ·
<b>scores:</b> {e(trajectory)}</p>
{_mentor_errors(data)}
<p class="legend muted">MICS-Score {legend}
<span><i class="ring r-path"></i>blue ring: chosen path</span>
<span><i class="ring r-sel"></i>orange ring: selected</span>
<span><i class="ring r-reused"></i>dashed: reused step</span>
<span><i class="ring r-leak"></i>red dashed, ⚠: step leaks the answer</span>
<span><i class="ring r-ghost"></i>✗: mentor call failed</span>
<span>hover for the step, click for details; wheel or buttons zoom, drag pans</span></p>
</header>
<div id="main"><div id="canvas"><div id="zoom"></div></div>
<aside id="detail"><p class="muted">Click a node.</p></aside></div>
<div id="hover" role="tooltip"></div>
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
