"""data_pipelines.doc_markup: prose paragraphs of HTML, reST and POD.

The HTML page and the reST source are those of the Debian docs package
fixture (`fixtures/debian_docs_pkg/alpha-doc`).
"""

import dp_testlib as testlib

from data_pipelines import doc_markup

PKG_TREE = testlib.DEBIAN_DOCS_PKG / "alpha-doc"


def test_html_boilerplate_and_code_removed():
  text = (PKG_TREE / "usr/share/doc/alpha-doc/html/intro.html").read_text()
  assert doc_markup.html_paragraphs(text) == [
      "Introduction to Alpha",
      "Alpha is a small tool. It reads the input files, e.g. logs, and"
      " writes a report!",
      "Use the alpha --fast option when you are in a hurry.",
      "The first item is a sentence of its own",
      "and so is the second item",
      "x = 1; y = 2; z = [3, 4]",
  ]


def test_rst_markup_directives_and_literal_blocks():
  path = PKG_TREE / "usr/share/doc/alpha-doc/html/_sources/guide/usage.rst.txt"
  assert doc_markup.rst_paragraphs(path.read_text()) == [
      "Using Alpha",
      "Alpha reads a configuration file and the --input files. See the home"
      " page for news.",
      "To run it, type:",
      "The report is written to the standard output.",
      "Runs the tool on the given path.",
      "Don't panic if it doesn't work at first.",
  ]


def test_pod_paragraphs():
  pod = (
      "=head1 NAME\n\nperlfoo - the B<foo> manual\n\n=head2 Using"
      " C<< $x->foo >>\n\nCall I<foo> with L<perlfunc/open> or"
      " L<the guide|perlguide>; 1 E<lt> 2.\n\n    my $x = 1;  # verbatim\n\n"
      "=begin html\n\n<p>skipped</p>\n\n=end html\n\n=cut\n"
  )
  assert doc_markup.pod_paragraphs(pod) == [
      "NAME",
      "perlfoo - the foo manual",
      "Using $x->foo",
      "Call foo with perlfunc open or the guide; 1 < 2.",
  ]
